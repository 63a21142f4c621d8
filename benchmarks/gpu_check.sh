#!/usr/bin/env bash
# The GPU check of the trainer in one call (benchmarks/README.md, "gpu_check.py"):
#
#   bash benchmarks/gpu_check.sh [gpu_check.py options]   make gpu-check: on the GPU machine
#   bash benchmarks/gpu_check.sh --wheels                  make gpu-wheels: here, with PyPI
#
# The check installs what the GPU machine lacks (it has torch, triton, numpy, no internet) from
# the wheels in .whl/ unless the pinned versions are importable already, pins
# TORCH_CUDA_ARCH_LIST to the device (DeepSpeed's op builds cannot parse torch's own "9.0a"),
# then runs benchmarks/gpu_check.py under a hard time limit.
#
# Environment: GPU_CHECK_PYTHON (python3; .venv/bin/python with --small), GPU_CHECK_WHEELS (.whl), GPU_CHECK_TIMEOUT_S (530:
# gpu_check.py's --budget-s of 450 s, the rows running then, and the report; a run stopped by
# the limit keeps the JSON of the rows it finished).
set -euo pipefail
cd "$(dirname "$0")/.."

# The GPU machine's python3 holds its torch; the CPU check (--small) runs in this repo's venv.
PY=${GPU_CHECK_PYTHON:-python3}
if [ -z "${GPU_CHECK_PYTHON:-}" ] && [[ " $* " == *" --small "* ]] && [ -x .venv/bin/python ]; then
	PY=.venv/bin/python
fi
WHEELS=${GPU_CHECK_WHEELS:-.whl}
# The GPU image's pin (CUDA only, so not in requirements/: the CPU venv cannot run it).
LIGER_KERNEL=$(grep -m1 "^liger-kernel==" docker/requirements-gpu.txt) ||
	{ echo "gpu_check.sh: liger-kernel is not pinned in docker/requirements-gpu.txt" >&2 && exit 1; }
# What the GPU machine's image holds (its torch is 2.11 + CUDA 13, Python 3.12): the resolver
# treats these as installed, so .whl/ carries everything else the packages below need.
DEVICE_HAS=(torch==2.11.0 triton==3.6.0 numpy==2.5.2)
DEVICE_PYTHON=${GPU_CHECK_DEVICE_PYTHON:-3.12}
DEVICE_PLATFORMS=(manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_28_x86_64
	manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64)

# The version requirements/constraints.txt pins for a package; fails naming it when unpinned.
pin() {
	grep -i -m1 "^$1==" requirements/constraints.txt ||
		{ echo "gpu_check.sh: $1 is not pinned in requirements/constraints.txt" >&2 && exit 1; }
}

# What the training path imports beyond the device's packages, at the CPU suite's versions
# (liger-kernel only where CUDA runs it).
requirements() {
	for name in deepspeed pydantic PyYAML hjson transformers huggingface_hub tokenizers safetensors \
		peft bitsandbytes; do
		pin "$name"
	done
	if [ "$1" = cuda ]; then echo "$LIGER_KERNEL"; fi
}

# Exit 0 when every requirement is installed at its version and `pipeline` is this checkout.
ready() {
	"$PY" - "$@" <<'EOF'
import importlib.metadata as md
import pathlib
import sys

from packaging.requirements import Requirement

for spec in sys.argv[1:]:
    req = Requirement(spec)
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        sys.exit(f"{req.name} is not installed")
    if version not in req.specifier:
        sys.exit(f"{req.name} {version} is installed, the check needs {req.specifier}")
try:
    import pipeline.config
except ImportError as err:
    sys.exit(f"the project is not importable: {err}")
if pipeline.config.REPO_ROOT != pathlib.Path.cwd():
    sys.exit(f"pipeline is imported from {pipeline.config.REPO_ROOT}, not this checkout")
EOF
}

install() {
	if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
		echo "gpu_check.sh: no wheels in $WHEELS; run 'make gpu-wheels' on a machine with PyPI" \
			"and carry $WHEELS (benchmarks/README.md)" >&2
		exit 1
	fi
	echo "gpu_check.sh: installing from $WHEELS: $*"
	"$PY" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS" "$@"
	# Editable, so that pipeline.config.REPO_ROOT is this checkout (configs/demo.yaml).
	"$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps \
		--no-build-isolation -e .
}

# Empty wheels standing for the device's own packages, for the resolver only.
write_stubs() {
	"$PY" - "$@" <<'EOF'
import sys
import zipfile

out, *pins = sys.argv[1:]
for spec in pins:
    name, version = spec.split("==")
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(f"{out}/{name}-{version}-py3-none-any.whl", "w") as whl:
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")
EOF
}

# bitsandbytes' wheel carries its kernels for every CUDA and ROCm release (43 MB, more than the
# device tool carries with the rest); the device runs CUDA 13, so keep those and the CPU ones.
# The files kept are unchanged, and so are their RECORD lines.
slim_bitsandbytes() {
	"$PY" - "$1" <<'EOF'
import os
import re
import sys
import zipfile

path = sys.argv[1]
drop = re.compile(r"bitsandbytes/libbitsandbytes_(cuda1[0-2]\d|rocm\d+)\.so$")
with zipfile.ZipFile(path) as src, zipfile.ZipFile(path + ".slim", "w", zipfile.ZIP_DEFLATED) as out:
    for item in src.infolist():
        if drop.search(item.filename):
            continue
        data = src.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            kept = [line for line in data.decode().splitlines() if not drop.search(line.split(",")[0])]
            data = "".join(f"{line}\n" for line in kept).encode()
        out.writestr(item, data)
os.replace(path + ".slim", path)
EOF
}

fill_wheels() {
	tmp=$(mktemp -d)
	trap 'rm -rf "$tmp"' EXIT
	# One version of each package: stale wheels of earlier pins would be picked over the pins'
	# dependencies' own.
	rm -rf "$WHEELS"
	mkdir -p "$WHEELS" "$tmp/stubs"
	# An sdist: built against this venv's torch, ops left to DeepSpeed's JIT on the device.
	DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps \
		--no-build-isolation -w "$WHEELS" "$(pin deepspeed)"
	local stubs=("${DEVICE_HAS[@]/%/+device}")
	write_stubs "$tmp/stubs" "${stubs[@]}"
	{
		grep -v -i -E '^(torch|triton|numpy|nvidia-[a-z0-9-]*)==' requirements/constraints.txt
		printf '%s\n' "${stubs[@]}"
	} >"$tmp/constraints.txt"
	local platforms=()
	for p in "${DEVICE_PLATFORMS[@]}"; do platforms+=(--platform "$p"); done
	local target=(--only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp
		"${platforms[@]}" --find-links "$tmp/stubs")
	# shellcheck disable=SC2046  # one requirement a word
	"$PY" -m pip download --quiet --disable-pip-version-check "${target[@]}" \
		--find-links "$WHEELS" -c "$tmp/constraints.txt" -d "$WHEELS" $(requirements cuda)
	rm -f "$WHEELS"/*+device-py3-none-any.whl
	slim_bitsandbytes "$WHEELS"/bitsandbytes-*.whl
	# The closure, checked: the requirements resolve from the wheels and the stand-ins alone.
	# shellcheck disable=SC2046
	"$PY" -m pip install --quiet --disable-pip-version-check --dry-run --ignore-installed \
		--no-index "${target[@]}" --find-links "$WHEELS" --target "$tmp/target" \
		$(requirements cuda)
	ls "$WHEELS"
	du -sh "$WHEELS"
}

if [ "${1:-}" = --wheels ]; then
	fill_wheels
	exit 0
fi

device=$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
listed=$(requirements "$device")
mapfile -t needed <<<"$listed"
if ! ready "${needed[@]}"; then
	install "${needed[@]}"
	ready "${needed[@]}"
fi
if [ "$device" = cuda ] && [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
	TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
	export TORCH_CUDA_ARCH_LIST
fi
export PYTHONUNBUFFERED=1
exec timeout --signal=INT --kill-after=30 "${GPU_CHECK_TIMEOUT_S:-530}" \
	"$PY" benchmarks/gpu_check.py "$@"
