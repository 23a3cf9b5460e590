"""Make a CUDA-built torchvision importable beside a CPU torch (no-op when it already imports).

Its compiled ops (`_C.so`, `image.so`) need CUDA libraries; the transforms the VL image
processors use are pure torch. We remove the ops and guard the registrations that need them.
"""

import pathlib
import subprocess
import sys
import sysconfig

tv = pathlib.Path(sysconfig.get_paths()["purelib"]) / "torchvision"
if not tv.exists():
    sys.exit(0)
probe = subprocess.run([sys.executable, "-c", "import torchvision"], check=False, capture_output=True)
if probe.returncode == 0:
    sys.exit(0)
for so in ("_C.so", "image.so"):
    (tv / so).unlink(missing_ok=True)
init = tv / "__init__.py"
src = init.read_text()
old = "from torchvision import (\n    _autograd_registrations,\n    _meta_registrations,\n    datasets,"
new = (
    "if extension._has_ops():\n"
    "    from torchvision import _autograd_registrations, _meta_registrations  # noqa\n"
    "from torchvision import (\n    datasets,"
)
if old in src:
    init.write_text(src.replace(old, new))
check = subprocess.run([sys.executable, "-c", "import torchvision"], check=False, capture_output=True,
                       text=True)
if check.returncode != 0:
    sys.exit(f"[install] torchvision still fails to import after the CPU fix:\n{check.stderr[-2000:]}")
print("[install] torchvision patched to import without its CUDA ops")
