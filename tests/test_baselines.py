"U-Net and LViT-T baselines at the papers' sizes: parameter counts, MACs by both counters, text, gradients, bad inputs."
import importlib.util
import sys

import pytest
import torch

from reclmis_nb.baselines import BASELINE_PRESETS, LViT, UNet, baseline_preset, build_model, lvit_unused_released
from reclmis_nb.profile import flop_counter_macs, profile, thop_count, used_parameters
from reclmis_nb.text import TextEncoder


# MACs of one image, measured once and pinned (a change means the architecture changed)
UNET_MACS, UNET_THOP = 22_645_833_728, 25_185_140_736          # 224 x 224: FlopCounterMode, thop
LVIT_MACS, LVIT_THOP = 27_118_589_312, 27_077_996_928
SMALL_UNET_MACS, SMALL_LVIT_MACS = 467_664_896, 563_305_472    # the small presets at 128 x 128, FlopCounterMode


def n_params(m, trainable=False): return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)


@pytest.fixture(scope='module')
def tiny768():
    "A fast frozen text encoder giving LViT's 10 tokens of 768"
    return TextEncoder('tiny', max_tokens=10, dim=768)


@pytest.fixture(scope='module')
def paper_counts(tiny768):
    "FlopCounterMode and thop counts of one 224 x 224 image for both baselines (LViT with the fast tiny text encoder)"
    torch.manual_seed(0)
    x, t, mask = torch.rand(1, 3, 224, 224), torch.randn(1, 10, 768), torch.ones(1, 10)
    res = {}
    for name, m in (('unet', UNet()), ('lvit', LViT(BASELINE_PRESETS['lvit'], tiny768))):
        res[name] = (flop_counter_macs(m, x, t, mask), *thop_count(m, x, t, mask))
    return res


def test_unet_paper_parameters():
    "LViT's nets/UNet.py: 14,751,873 parameters, within 2 % of the papers' 14.8 M; the small preset pinned too"
    n = n_params(UNet())
    assert n == 14_751_873
    assert abs(n / 14.8e6 - 1) < 0.02
    assert n_params(UNet(BASELINE_PRESETS['unet-small'])) == 924_705


def test_lvit_paper_parameters(tiny768):
    "Ours 29,908,033 (within 2 % of 29.7 M); + unused released modules = 39,933,345; - position embeddings = thop's 29,719,873"
    m = LViT(BASELINE_PRESETS['lvit'], tiny768)
    ours = n_params(m) - n_params(m.text_encoder)
    assert ours == 29_908_033 == n_params(m, trainable=True)
    assert abs(ours / 29.7e6 - 1) < 0.02
    unused = lvit_unused_released(m.cfg)
    assert unused == dict(up_path_patch_embeddings=4_383_424, vit_norms=3_840, vit_heads=1_928, ctbns=4_241_436,
                          pix_modules=1_045_564, plam_sigmoid_convs=349_120)
    assert ours + sum(unused.values()) == 39_933_345
    assert ours - sum(e.pos.numel() for e in m.vit.embed) == 29_719_873
    assert sum(n_params(c) for c in m.vit.text_convs) == 1_696_704      # 768->512->256->128->64, kernel 3
    small = LViT(BASELINE_PRESETS['lvit-small'], tiny768)
    assert n_params(small) - n_params(small.text_encoder) == 2_104_477


def test_paper_macs(paper_counts):
    "At 224: MACs pinned; thop's parameters 14.8 M and 29.7 M; thop on a batch of 2 within 2 % of the papers' FLOPs"
    (u_fc, u_thop, u_par), (l_fc, l_thop, l_par) = paper_counts['unet'], paper_counts['lvit']
    assert (u_fc, u_thop, l_fc, l_thop) == (UNET_MACS, UNET_THOP, LVIT_MACS, LVIT_THOP)
    assert (u_par, l_par) == (14_751_873, 29_719_873)
    assert abs(2 * u_thop / 50.3e9 - 1) < 0.02      # thop counts are linear in the batch (checked in the notebook)
    assert abs(2 * l_thop / 54.1e9 - 1) < 0.02


def test_flop_counter_stable(tiny768):
    "FlopCounterMode gives the same count twice, whatever the text's values and the model's mode before"
    torch.manual_seed(0)
    m = LViT(BASELINE_PRESETS['lvit-small'], tiny768).train()
    x, t, mask = torch.rand(1, 3, 128, 128), torch.randn(1, 10, 768), torch.ones(1, 10)
    first = flop_counter_macs(m, x, t, mask)
    assert flop_counter_macs(m, x, torch.randn(1, 10, 768), mask) == first == SMALL_LVIT_MACS
    assert flop_counter_macs(UNet(BASELINE_PRESETS['unet-small']), x) == SMALL_UNET_MACS



def test_text_changes_lvit_not_unet(tiny768):
    "Swapping the captions of a batch changes LViT's logits and leaves U-Net's untouched; padding is ignored"
    torch.manual_seed(0)
    lvit, unet = LViT(BASELINE_PRESETS['lvit-small'], tiny768).eval(), UNet(BASELINE_PRESETS['unet-small']).eval()
    x = torch.rand(2, 3, 128, 128)
    feats, mask = tiny768.encode(['bilateral pulmonary infection, two infected areas, upper left lung and lower right lung',
                                  'lower left lung'])
    with torch.no_grad():
        a, b = lvit(x, feats, mask)['logits'], lvit(x, feats.flip(0), mask.flip(0))['logits']
        assert (a - b).abs().max() > 1e-6
        assert torch.equal(unet(x, feats, mask)['logits'], unet(x, feats.flip(0), mask.flip(0))['logits'])
        noisy = feats + torch.randn_like(feats) * (mask == 0)[..., None]          # change only padded positions
        assert torch.equal(lvit(x, noisy, mask)['logits'], a)


@pytest.mark.parametrize('name', ['unet-small', 'lvit-small'])
def test_gradients_flow(name, tiny768):
    "One loss.backward() gives every trainable parameter a non-zero gradient; the text encoder gets none"
    torch.manual_seed(0)
    cfg = baseline_preset(name)
    m = UNet(cfg) if cfg.arch == 'unet' else LViT(cfg, tiny768)
    S = cfg.image_size
    feats, mask = tiny768.encode(['one infected area, lower left lung'] * 2)
    out = m.train()(torch.rand(2, 3, S, S), feats, mask)
    assert list(out) == ['logits'] and out['logits'].shape == (2, 1, S, S)
    m.total_loss(out, (torch.rand(2, 1, S, S) > 0.5).float()).backward()
    dead = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert dead == []
    if m.text_encoder is not None:
        assert all(p.grad is None for p in m.text_encoder.parameters()) and not m.text_encoder.training


def test_used_parameters_leave_out_training_only_parts(tiny768):
    "The inference path is what a forward reads: not LViT's text encoder nor a module never called; functional uses count"
    m = LViT(BASELINE_PRESETS['lvit-small'], tiny768)
    x, t = torch.rand(1, 3, 128, 128), torch.randn(1, 10, 768)
    assert used_parameters(m, x, t) == n_params(m) - n_params(tiny768)
    m.extra = torch.nn.Linear(10, 10)
    assert used_parameters(m, x, t) == n_params(m) - n_params(tiny768) - 110
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)        # uses out_proj's weights without calling it
    class SelfAttend(torch.nn.Module):
        def __init__(self): super().__init__(); self.mha = mha
        def forward(self, x): return self.mha(x, x, x)[0]
    assert used_parameters(SelfAttend(), torch.rand(1, 4, 8)) == n_params(mha) == 8 * 24 + 24 + 8 * 8 + 8


def test_profile_time_and_thop_missing(monkeypatch):
    "time=True adds a positive latency; without thop the counters fail with the install command"
    p = profile('unet', 'small', time=True, reps=1, image_size=32)
    assert p['latency_s'] > 0 and p['threads'] >= 1
    monkeypatch.setitem(sys.modules, 'thop', None)
    with pytest.raises(ImportError, match='pip install thop'): thop_count(UNet(BASELINE_PRESETS['unet-small']), torch.rand(1, 3, 32, 32))


def test_bad_inputs(tiny768):
    "Wrong text shape, image size, widths, heads, encoder or names fail with the value and what to do"
    m = LViT(BASELINE_PRESETS['lvit-small'], tiny768)
    x = torch.rand(2, 3, 128, 128)
    with pytest.raises(ValueError, match=r'\(2, 10, 768\), got \(2, 8, 768\)'): m(x, torch.randn(2, 8, 768))
    with pytest.raises(ValueError, match='got None'): m(x, None)
    with pytest.raises(ValueError, match='128 x 128'): m(torch.rand(2, 3, 96, 96), torch.randn(2, 10, 768))
    with pytest.raises(ValueError, match='double'): LViT(baseline_preset('lvit-small', widths=(16, 32, 64, 64, 64)), tiny768)
    with pytest.raises(ValueError, match='whole patch size'): LViT(baseline_preset('lvit-small', image_size=120), tiny768)
    with pytest.raises(ValueError, match='heads=5'): LViT(baseline_preset('lvit-small', heads=5), tiny768)
    with pytest.raises(ValueError, match='dim=768'): LViT(BASELINE_PRESETS['lvit-small'], TextEncoder('tiny', max_tokens=10, dim=512))
    with pytest.raises(ValueError, match='2 images but 1 sentences'): m.predict(x, ['one area'])
    with pytest.raises(ValueError, match="'unet', 'lvit' or 'reclmis'"): build_model('vit')
    with pytest.raises(ValueError, match="'small'"): build_model('unet', 'tiny')
    with pytest.raises(ValueError, match=r"\['head'\]"): baseline_preset('lvit', head=4)


def test_build_model_names(tiny768):
    "Dataset preset names mean the paper's size for the baselines; 'small' the CPU size"
    assert build_model('unet', 'mosmed').cfg.name == 'unet'
    m = build_model('lvit', 'small', reuse_text_encoder=tiny768)
    assert isinstance(m, LViT) and m.cfg.image_size == 128 and m.text_encoder is tiny768
    assert build_model('unet').text_encoder is None


@pytest.mark.skipif(importlib.util.find_spec('reclmis_nb.model') is None, reason='reclmis_nb.model not exported yet')
def test_build_reclmis_same_interface():
    "build_model('reclmis') gives RecLMIS, and profile() measures it like the baselines"
    p = profile('reclmis', 'small', text_encoder='tiny', image_size=64)
    assert p['model'] == 'reclmis' and 0 < p['params']['inference'] < p['params']['trainable']
    assert p['macs']['flop_counter'] > 0 and p['macs']['thop_batch2'] == 2 * p['macs']['thop']
