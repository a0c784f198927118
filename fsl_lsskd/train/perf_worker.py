"""One of the concurrent trainings of ``fsl-bench perf train --processes N`` (:class:`fsl_lsskd.train.perf._Concurrent`).

``python -m fsl_lsskd.train.perf_worker SPEC_JSON``: builds the cell of the spec (backbone, method, precision,
threads, the split's ``images.npy``/``labels.npy`` in ``workdir``, read without pickle), warms it up, prints
``{"store_bytes_per_sample": ...}``; then for every line ``N`` on stdin runs N engine steps and prints
``{"images": ...}``. Ends at the end of stdin. Internal: not a command for users."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    spec = json.loads((argv if argv is not None else sys.argv[1:])[0])
    if spec.get("malloc") == "retained":  # as the parent process
        from ..utils import retain_freed_memory

        retain_freed_memory()
    import numpy as np
    import torch

    from .loader import TrainLoader
    from .perf import _endless, _make_method, _Timed, store_bytes_per_sample

    torch.set_num_threads(int(spec["threads"]))
    work = Path(spec["workdir"])
    images = np.load(work / "images.npy", allow_pickle=False)
    labels = np.load(work / "labels.npy", allow_pickle=False)
    C = int(spec["num_classes"])
    dev = torch.device(spec["device"])
    loader = TrainLoader(images, labels, tuple(spec["mean"]), tuple(spec["std"]),
                         batch_size=int(spec["batch_size"]), seed=int(spec["seed"]), device=dev)
    method = _make_method(spec["method"], spec["backbone"], C, int(spec["num_samples"]), int(spec["image_size"]),
                          dev, int(spec["seed"]))
    cell = _Timed(method, _endless(method, loader), spec["precision"], dev)
    cell.run(int(spec["warmup"]))
    print(json.dumps({"store_bytes_per_sample": store_bytes_per_sample(method)}), flush=True)
    for line in sys.stdin:
        print(json.dumps({"images": cell.run(int(line))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
