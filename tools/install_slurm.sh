#!/usr/bin/env bash
# Install SLURM (slurmctld, slurmd, sbatch, squeue, ...) and MUNGE from the distribution when they are missing.
# tests/test_slurm_real.py starts a throw-away one-node cluster on loopback with them; without them it is skipped.
# Idempotent and quiet. Needs apt-get (Debian/Ubuntu) and root (or password-less sudo); on other machines it
# says so and changes nothing. The packages' own services are not used: the test starts its own daemons.
set -euo pipefail

where() {  # a program on PATH or in the system's sbin directories (not on a non-root user's PATH)
  command -v "$1" 2>/dev/null || { [ -x "/usr/sbin/$1" ] && echo "/usr/sbin/$1"; } || { [ -x "/sbin/$1" ] && echo "/sbin/$1"; }
}
versions() {  # without a cluster configuration sbatch --version fails; the daemons answer -V without one
  echo "$("$(where slurmd)" -V 2>/dev/null), $("$(where munged)" --version 2>/dev/null | cut -d' ' -f1)"
}

missing=0
for prog in sbatch srun squeue scancel sinfo slurmctld slurmd munged; do
  where "$prog" >/dev/null || { missing=1; break; }
done
if [ "$missing" = 0 ]; then
  echo "SLURM and MUNGE already installed ($(versions))"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "SLURM/MUNGE not installed and no apt-get here: skipped (install slurm-wlm and munge with your package" \
       "manager to run tests/test_slurm_real.py; it is skipped without them)"
  exit 0
fi
sudo=()
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
  else
    echo "SLURM/MUNGE not installed and installing them needs root: skipped (run" \
         "'sudo apt-get install slurm-wlm munge' to run tests/test_slurm_real.py; it is skipped without them)"
    exit 0
  fi
fi
log="$(mktemp)"; trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq --no-install-recommends slurm-wlm munge; } \
    >"$log" 2>&1; then
  echo "error: apt-get could not install slurm-wlm and munge:" >&2
  tail -n 20 "$log" >&2
  exit 1
fi
echo "installed $(versions)"
