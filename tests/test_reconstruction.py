"Conditioned masking, the reconstruction transformers and L_CCL at the paper's sizes, on bad inputs and devices."
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from reclmis_nb.reconstruction import (PatchesOfInterest, WordsOfInterest, conditioned_mask, ConditionedAttention,
                                       ReconstructionDecoderLayer, ConditionedReconstruction, reconstruction_losses,
                                       conditioned_contrastive_loss)


def n_params(m): return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize('rate', [0.1, 0.29, 0.3, 0.5, 0.7, 0.99])
def test_mask_counts_match_python_rounding(rate):
    "k = max(int(L_valid * rate), 1) for every valid length 0..18, including no valid token (nothing masked)"
    L = 18
    valid = torch.arange(L)[None] < torch.arange(L + 1)[:, None]          # row n has n valid positions
    w = torch.rand(L + 1, L) * valid
    _, masked = conditioned_mask(torch.ones(L + 1, L, 3), w, rate, valid=valid, generator=torch.Generator().manual_seed(0))
    expected = [min(max(int(n * rate), 1), n) for n in range(L + 1)]
    assert masked.sum(1).tolist() == expected
    assert not masked[~valid].any()


def test_paper_sizes_image_and_text():
    "196 patches at QaTa's 0.5 and MosMed's 0.3; 18 tokens with variable valid lengths at 0.3"
    g = torch.Generator().manual_seed(3407)
    V, W_poi = torch.randn(8, 196, 16), torch.randn(8, 196).softmax(-1)
    for rate, k in [(0.5, 98), (0.3, 58)]:
        V_m, m = conditioned_mask(V, W_poi, rate, generator=g)
        assert (m.sum(1) == k).all() and (V_m[m] == 0).all() and torch.equal(V_m[~m], V[~m])
    lengths = torch.tensor([2, 3, 7, 10, 13, 18, 5, 4])
    text_mask = (torch.arange(18)[None] < lengths[:, None]).long()
    W_woi = torch.randn(8, 18).masked_fill(text_mask == 0, float('-inf')).softmax(-1)
    _, m = conditioned_mask(torch.randn(8, 18, 16), W_woi, 0.3, valid=text_mask, generator=g)
    assert m.sum(1).tolist() == [max(int(n * 0.3), 1) for n in lengths.tolist()]
    assert not m[text_mask == 0].any()


def test_generator_reproducible_and_gradient_through_unmasked():
    x = torch.randn(4, 30, 8, requires_grad=True); w = torch.rand(4, 30)
    a = conditioned_mask(x, w, 0.4, generator=torch.Generator().manual_seed(7))
    b = conditioned_mask(x, w, 0.4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[1], b[1])
    a[0].sum().backward()
    assert torch.equal(x.grad[..., 0], (~a[1]).float())  # masked tokens get no gradient, the others 1


def test_zero_weight_fill_is_uniform():
    "Two positive weights, k = 5 of 12: the 3 extra picks spread uniformly over the 10 zero-weight positions"
    reps = 6000
    w = torch.zeros(reps, 12); w[:, 4] = 0.9; w[:, 9] = 0.1
    _, m = conditioned_mask(torch.ones(reps, 12, 1), w, 5 / 12, generator=torch.Generator().manual_seed(11))
    assert m[:, [4, 9]].all()
    zero = m[:, [i for i in range(12) if i not in (4, 9)]].sum(0).float()
    expected = reps * 3 / 10
    chi2 = ((zero - expected) ** 2 / expected).sum()
    assert chi2 < 27.88, chi2   # 9 degrees of freedom, 0.1% level


def test_same_distribution_as_numpy_choice_without_replacement():
    "The release's sampler (np.random.choice(replace=False, p=p)): the same probabilities for each ordered-free pair"
    p = np.array([0.5, 0.25, 0.15, 0.1]); reps = 8000
    rng = np.random.default_rng(0)
    ref = np.zeros((4, 4))
    for _ in range(reps):
        i, j = sorted(rng.choice(4, 2, replace=False, p=p)); ref[i, j] += 1
    _, m = conditioned_mask(torch.ones(reps, 4, 1), torch.tensor(p).expand(reps, 4), 0.5,
                            generator=torch.Generator().manual_seed(0))
    ours = np.zeros((4, 4))
    for i, j in m.nonzero()[:, 1].view(reps, 2).tolist(): ours[i, j] += 1
    iu = np.triu_indices(4, 1)
    assert np.abs(ours[iu] / reps - ref[iu] / reps).max() < 0.03, (ours[iu], ref[iu])


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype):
    x = torch.randn(3, 20, 4, dtype=dtype); w = torch.rand(3, 20).to(dtype)
    x_m, m = conditioned_mask(x, w, 0.5)
    assert x_m.dtype == dtype and (m.sum(1) == 10).all()


def test_meta_device_full_path():
    "Shapes propagate through masking, reconstruction and L_CCL on the meta device (what a profiler needs)"
    with torch.device('meta'):
        V, E = torch.empty(2, 196, 512), torch.empty(2, 18, 512)
        W_poi, W_woi, mask = torch.empty(2, 196), torch.empty(2, 18), torch.ones(2, 18)
        rec = ConditionedReconstruction(512, 4, 4)
        V_m, m = conditioned_mask(V, W_poi, 0.5)
        out = rec(E, W_woi, V_m)
        ccl = conditioned_contrastive_loss(E, V, mask, W_woi, W_poi)
    assert out.shape == (2, 196, 512) and out.device.type == 'meta' and m.shape == (2, 196) and ccl.shape == ()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device here')
def test_cuda():
    x = torch.randn(2, 196, 8, device='cuda'); w = torch.rand(2, 196, device='cuda')
    x_m, m = conditioned_mask(x, w, 0.5, generator=torch.Generator('cuda').manual_seed(0))
    assert m.device.type == 'cuda' and (m.sum(1) == 98).all()


@pytest.mark.parametrize('bad', [float('nan'), -0.1, float('inf')])
def test_bad_weights_fail_loudly(bad):
    w = torch.rand(2, 10); w[1, 3] = bad
    with pytest.raises(ValueError, match='finite and >= 0'): conditioned_mask(torch.ones(2, 10, 2), w, 0.3)


def test_shape_mismatch_and_heads():
    with pytest.raises(ValueError, match=r'weights must be \(B, L\)'):
        conditioned_mask(torch.ones(2, 10, 2), torch.rand(2, 9), 0.3)
    with pytest.raises(ValueError, match='not divisible by heads'): ConditionedAttention(30, 4)


def test_parameter_counts_paper_size():
    with torch.device('meta'):
        assert n_params(PatchesOfInterest(512)) == n_params(WordsOfInterest(512, 0.5)) == 263_169
        assert n_params(ConditionedAttention(512, 4)) == 1_050_624
        assert n_params(ReconstructionDecoderLayer(512, 4, 1024, 0.1, cross=True)) == 3_154_432
        for L, ours, release in [(4, 21_028_864, 25_235_456), (3, 15_771_648, 18_926_592)]:
            rec = ConditionedReconstruction(512, 4, L)
            assert (n_params(rec), rec.released_parameter_count()) == (ours, release)


def test_attention_matches_torch_multihead_attention():
    "Without condition weights it is nn.MultiheadAttention (same parameter layout), causal mask included"
    torch.manual_seed(0)
    ours, ref = ConditionedAttention(32, 4), torch.nn.MultiheadAttention(32, 4, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    q, kv = torch.randn(2, 6, 32), torch.randn(2, 6, 32)
    causal = torch.ones(6, 6, dtype=torch.bool).triu(1)
    o1, p1 = ours(q, kv, causal=True)
    o2, p2 = ref(q, kv, kv, attn_mask=causal)
    torch.testing.assert_close(o1, o2, atol=1e-5, rtol=1e-5); torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5)


def test_condition_weights_formula():
    "probs = softmax * (w + 1e-10), renormalised, per head"
    torch.manual_seed(0)
    att = ConditionedAttention(16, 2)
    q, kv, w = torch.randn(1, 3, 16), torch.randn(1, 5, 16), torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0]])
    _, plain = att(q, kv)
    _, cond = att(q, kv, weights=w)
    # with one head the formula holds on the returned (head-averaged) probabilities directly
    att1 = ConditionedAttention(16, 1)
    _, p1 = att1(q, kv); _, c1 = att1(q, kv, weights=w)
    expected = p1 * (w + 1e-10); expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(c1, expected)
    assert cond[..., 3:].max() < 1e-8 and not torch.allclose(cond, plain)


def test_reconstruction_losses_paper_size_and_gradients():
    "One training step's losses at 512 wide, 196 patches, 18 tokens, batch 2, QaTa rates"
    torch.manual_seed(0)
    B = 2
    V, V_p, E, E_clip = torch.randn(B, 196, 512), torch.randn(B, 196, 512), torch.randn(B, 18, 512), torch.randn(B, 18, 512)
    text_mask = (torch.arange(18)[None] < torch.tensor([[9], [14]])).long()
    poi, woi = PatchesOfInterest(512), WordsOfInterest(512)
    W_poi, W_woi = poi(V_p), woi(torch.randn(B, 18, 512), text_mask)
    rec_v, rec_t = ConditionedReconstruction(512, 4, 4), ConditionedReconstruction(512, 4, 4)
    l_t2v, l_v2t = reconstruction_losses(V, V_p, E, E_clip, text_mask, W_poi, W_woi, rec_v, rec_t, 0.5, 0.3,
                                         generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(l_t2v) and torch.isfinite(l_v2t)
    (l_t2v + l_v2t).backward()
    for m in (poi, woi, rec_v, rec_t):
        assert all(p.grad is not None for p in m.parameters()), type(m).__name__  # no unused (gradient-less) module


def test_reconstruction_flops_counted():
    "FlopCounterMode sees the attention matmuls (2 x B x h x Lq x Lk x dh multiply-adds each)"
    rec = ConditionedReconstruction(64, 4, 1, ffn=128)
    V, E, w = torch.randn(1, 49, 64), torch.randn(1, 8, 64), torch.rand(1, 8)
    with FlopCounterMode(display=False) as fc: rec(E, w, V)
    d = 64
    lin = lambda L, i, o: L * i * o
    macs = (lin(8, d, 3 * d) + lin(8, d, d) + 2 * 8 * 8 * d + lin(8, d, 128) + lin(8, 128, d)   # stack 1 layer
            + lin(49, d, 3 * d) + lin(49, d, d) + 2 * 49 * 49 * d                                  # stack 2 self
            + lin(49, d, d) + lin(8, d, 2 * d) + lin(49, d, d) + 2 * 49 * 8 * d                    # stack 2 cross
            + lin(49, d, 128) + lin(49, 128, d))
    assert fc.get_total_flops() == 2 * macs


def test_ccl_paper_batch_and_reference():
    "B = 32, T = 18, N = 196 runs; on a small batch it equals a direct loop over the pairs"
    torch.manual_seed(0)
    B, T, N, d = 32, 18, 196, 64
    E, V = torch.randn(B, T, d), torch.randn(B, N, d)
    mask = (torch.arange(T)[None] < torch.randint(3, T + 1, (B, 1))).long()
    W_woi = torch.randn(B, T).masked_fill(mask == 0, float('-inf')).softmax(-1); W_poi = torch.randn(B, N).softmax(-1)
    loss = conditioned_contrastive_loss(E, V, mask, W_woi, W_poi)
    assert loss.shape == () and torch.isfinite(loss)
    b = 3
    En, Vn = F.normalize(E[:b], dim=-1), F.normalize(V[:b], dim=-1)
    wt, wv = W_woi[:b].softmax(-1), W_poi[:b].softmax(-1)
    logits = torch.zeros(b, b)
    for i in range(b):
        for j in range(b):
            S = En[i] @ Vn[j].T * mask[i, :, None]
            logits[i, j] = 50 * ((S.max(1).values * wt[i]).sum() + (S.max(0).values * wv[j]).sum())
    t = torch.arange(b)
    ref = (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t)) / 2
    torch.testing.assert_close(conditioned_contrastive_loss(E[:b], V[:b], mask[:b], W_woi[:b], W_poi[:b]), ref)


def test_ccl_gradients_reach_weights_and_features():
    E = torch.randn(4, 6, 16, requires_grad=True); V = torch.randn(4, 20, 16, requires_grad=True)
    wt = torch.rand(4, 6, requires_grad=True); wv = torch.rand(4, 20, requires_grad=True)
    conditioned_contrastive_loss(E, V, torch.ones(4, 6), wt, wv, double_softmax=False).backward()
    assert all(t.grad.abs().sum() > 0 for t in (E, V, wt, wv))
