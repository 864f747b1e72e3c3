import configparser
import subprocess
import sys
from importlib import resources
from pathlib import Path


def test_import_is_lean():
    code = (
        "import sys, lightning_sgsc\n"
        "heavy = ('hydra', 'torch_pruning', 'pytorch_grad_cam', 'sklearn', 'safetensors')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.startswith(heavy)}))\n"
        "import torch; print(torch.cuda.is_initialized())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "False"


def test_public_api_names_resolve():
    import lightning_sgsc

    assert all(hasattr(lightning_sgsc, name) for name in lightning_sgsc.__all__)
    assert {"SafetyGuidedQuantization", "SafetyGuidedMixin", "quantize_", "model_size"} <= set(lightning_sgsc.__all__)


def test_the_package_ships_its_type_annotations_and_the_kernel_source():
    # PEP 561: the py.typed marker in the package; the C source the native quantizer compiles at first use
    assert resources.files("lightning_sgsc").joinpath("py.typed").is_file()
    assert resources.files("lightning_sgsc").joinpath("quant/_kernel.c").is_file()
    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parents[1] / "setup.cfg")
    assert setup.get("options.package_data", "lightning_sgsc").split() == ["py.typed", "quant/_kernel.c"]
