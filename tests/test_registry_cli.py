import pytest
from click.testing import CliRunner

from fsl_lsskd.cli import main
from fsl_lsskd.errors import UnknownNameError
from fsl_lsskd.registry import Registry


def test_unknown_name_lists_valid_names_and_suggests():
    reg = Registry("method")
    reg.register("lsskd")(type("A", (), {}))
    reg.register("pskd")(type("B", (), {}))
    with pytest.raises(UnknownNameError) as exc:
        reg.get("lskd")
    msg = str(exc.value)
    assert "unknown method 'lskd'" in msg and "Did you mean 'lsskd'" in msg and "lsskd, pskd" in msg


def test_duplicate_registration_rejected():
    reg = Registry("dataset")
    reg.register("x")(type("A", (), {}))
    with pytest.raises(ValueError):
        reg.register("x")(type("B", (), {}))


def test_cli_help_lists_commands():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0 and "ls" in res.output
