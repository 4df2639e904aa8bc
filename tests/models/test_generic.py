"""The generic path's own pieces, on small hand-built modules: the intercepted attention computes what torch's
does (quantizers off), only the owner's own calls are intercepted, BatchNorms that cannot be folded stay in
float with a note, what it cannot quantize is refused by name, and the units reproduce the model."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import tiny_images, tiny_model

import vitq
from vitq.errors import VitqError
from vitq.models import family_of
from vitq.models.generic_ops import OpSite
from vitq.models.trunk import Trunk
from vitq.quant.base import quantizers_of
from vitq.scheme import Scheme

pytestmark = pytest.mark.usefixtures("one_thread")


class Attn(nn.Module):
    """Fused attention over [B, N, C], with a mask option."""

    def __init__(self, dim=16, heads=2, fused=True, causal=False):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.heads, self.fused, self.causal = heads, fused, causal

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.fused:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            o = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, N, C))


class Net(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, 4)
        self.blocks = nn.Sequential(*[Attn(**kw) for _ in range(2)])
        self.head = nn.Linear(16, 5)
        self.pretrained_cfg = {"input_size": (3, 16, 16)}  # the size the generic path traces at

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        return self.head(self.blocks(x).mean(1))


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"fused": False}])
def test_intercepted_attention_is_the_model_own_with_quantizers_off(kw):
    torch.manual_seed(0)
    net = Net(**kw).eval()
    x = torch.randn(2, 3, 16, 16)
    q = vitq.prepare(net, Scheme("matmul"))
    assert family_of(net).name == "generic"
    sites = [m for m in q.modules() if isinstance(m, OpSite)]
    assert len(sites) == (2 if kw.get("fused", True) else 4)  # per block: one attention call, or two matmuls
    roles = {m.role for n, m in quantizers_of(q).items() if "vitq_ops" in n}
    assert roles == {"q", "k", "v", "softmax"}
    with torch.no_grad():  # uncalibrated quantizers are the identity
        assert torch.allclose(q(x), net(x), atol=1e-5)
    vitq.calibrate(q, x, method="minmax", progress=False)
    assert all(bool(m.initialized) for m in quantizers_of(q).values())
    with torch.no_grad():
        assert F.cosine_similarity(q(x), net(x)).min() > 0.99


def test_a_child_matmul_is_not_taken_for_the_owner():
    class Inner(nn.Module):
        def forward(self, a, b):
            return a @ b

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.lin = Inner(), nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(self.inner(x, x.transpose(-2, -1)) @ x)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Outer()

        def forward(self, x):
            return self.body(x[:, 0, :4, :4]).mean((1, 2)).unsqueeze(1).expand(-1, 3)

    q = vitq.prepare(M().eval(), Scheme("matmul"))
    assert len(q.body.inner.vitq_ops) == 1 and len(q.body.vitq_ops) == 1
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        q(x)  # the calls are counted per owner: a mix-up would raise


def test_batchnorm_after_an_addition_is_kept_in_float_with_a_note():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
            self.c, self.bn2, self.head = nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.bn2(self.c(self.bn(self.a(x) + self.b(x)))).mean((2, 3)))

    m = M().eval()
    with torch.no_grad():
        for bn in (m.bn, m.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="BatchNorm"):
        q = vitq.prepare(m, Scheme("matmul"))
    assert isinstance(q.bn, nn.BatchNorm2d) and isinstance(q.bn2, nn.Identity)  # bn2 folded into c
    assert any("bn" in n and "float" in n for n in q.vitq_notes)
    with torch.no_grad():
        assert torch.allclose(q(x), m(x), atol=1e-5)


def test_a_batchnorm_whose_layer_output_is_read_elsewhere_is_not_folded():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.c2, self.bn2, self.head = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Linear(4, 3)

        def forward(self, x):
            y = self.c1(x)
            return self.head((self.bn2(self.c2(self.bn1(y))) + y).mean((2, 3)))

    torch.manual_seed(0)
    m = M().eval()
    with torch.no_grad():
        for bn in (m.bn1, m.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 2)
    with pytest.warns(UserWarning, match="bn1"):
        q = vitq.prepare(m, Scheme("matmul"))
    assert isinstance(q.bn1, nn.BatchNorm2d) and isinstance(q.bn2, nn.Identity)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(q(x), m(x), atol=1e-5)


def test_what_cannot_be_quantized_is_refused_by_name():
    class Own(nn.Module):  # feeds a child's weight to F.linear: the layer's quantizers would be bypassed
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return F.linear(x, self.lin.weight)

    with pytest.raises(VitqError, match=r"body \(Own\).*linear"):
        vitq.prepare(_wrap(Own()), Scheme("matmul"))
    with pytest.raises(VitqError, match=r"body \(Conv1d\)"):
        vitq.prepare(_wrap(nn.Conv1d(4, 4, 1)), Scheme("matmul"))
    with pytest.raises(VitqError, match="generic.*matmul"):
        vitq.prepare(_wrap(nn.Linear(4, 4)), Scheme("fq"))


def _wrap(body: nn.Module) -> nn.Module:
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, x):
            return self.body(x.flatten(1)[:, :4].reshape(-1, 4, 1) if isinstance(body, nn.Conv1d) else x[:, 0, 0, :4])

    return M().eval()


# a stage-wise CNN (RepVGG), a hierarchical hybrid (TinyViT) and a model with no chain of blocks (CrossViT)
@pytest.mark.parametrize("key", ["g_repvgg", "g_tinyvit", "g_crossvit"])
def test_units_reproduce_the_model_and_block_wise_methods_run(key):
    model, x = tiny_model(key), tiny_images(key, 8)
    rounding = "gptq"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q, record = vitq.quantize(model, x, "matmul", "minmax", rounding=rounding, refine="evolq",
                                  refine_options={"evolq": {"passes": 1, "cycles": 1, "population": 4, "sample": 2}},
                                  batch_size=4, progress=False, w_bits=4, a_bits=8)
        trunk = Trunk(q)
    h = trunk.stem(x)
    with torch.no_grad():
        for _, u in trunk.units:
            h = u(h)
        assert torch.allclose(trunk.tail(h), q(x), atol=1e-5)
    assert record["prepare_notes"]
    assert (len(trunk.units) == 1) == (key == "g_crossvit")  # CrossViT's branches: no chain, one unit
