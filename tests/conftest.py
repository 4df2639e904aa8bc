import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"

# tiny random-init models of the three families (built by timm, no weights downloaded)
TINY = {
    "deit": ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, num_classes=10)),
    "vit": ("vit_small_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2,
                                          class_token=False, global_pool="avg", fc_norm=True, num_classes=10)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=56, depths=(2, 2), num_heads=(2, 4), embed_dim=32,
                                                  window_size=7, num_classes=10)),
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    name, kw = TINY[family]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **kw).eval()


def tiny_images(family: str, n: int = 8, seed: int = 0) -> torch.Tensor:
    size = TINY[family][1]["img_size"]
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def make_image_folder(root: Path, classes=("n01440764", "n01443537", "n15075141"), per_class: int = 4,
                      size: int = 40, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"img{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "images")
