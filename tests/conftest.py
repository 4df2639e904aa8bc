import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from zoo import TINY, ZOO, tiny_images, tiny_model  # noqa: E402,F401  (the tiny models; tests import them from here)

torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP's spin-waiting makes many
    small ops several times slower: one thread for a module's tests, restored afterwards. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
