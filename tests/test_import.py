import subprocess
import sys


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
