"Text encoders: offline failures, the real MiniLM, local folders, the cache, frozen weights."
import importlib.util, socket
from unittest import mock
import pytest
import torch
from torch import nn
import huggingface_hub.constants
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from reclmis_nb.text import TextEncoder, TextModelUnavailable, clip_bpe_file, clip_tokenizer, from_hub

from conftest import SHARED_DATA

CXR_TOKENIZER = SHARED_DATA / 'cxr-bert-tokenizer'
QATA = ['Bilateral pulmonary infection, two infected areas, upper left lung and upper right lung.',
        'Unilateral pulmonary infection, one infected area, middle left lung.',
        'Bilateral pulmonary infection, three infected areas, all left lung and lower right lung.']


@pytest.fixture(scope='module')
def minilm(): return TextEncoder('minilm')


@pytest.mark.parametrize('name,kw', [('clip', {}), ('cxr-bert', {}), ('openai/clip-vit-base-patch32', {})])
def test_offline_hub_id_fails_fast_and_clearly(name, kw):
    "Offline, no connection is even attempted (so nothing can hang): counted, not timed"
    with mock.patch.object(socket.socket, 'connect', side_effect=OSError('network used')) as connect:
        with pytest.raises(TextModelUnavailable, match='pass it: TextEncoder') as e: TextEncoder(name, **kw)
    assert connect.call_count == 0
    assert 'huggingface-cli download' in str(e.value) and 'DIR' in str(e.value)


def test_no_network_without_offline_flag_fails_fast(monkeypatch):
    "Without HF_HUB_OFFLINE, an unreachable hub is detected by one probe with a 3 s timeout, not 30 s of retries"
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(huggingface_hub.constants, 'ENDPOINT', 'https://hub.invalid')
    probes = []
    def unreachable(address, timeout=None, *a, **kw): probes.append((address, timeout)); raise OSError('unreachable')
    monkeypatch.setattr(socket, 'create_connection', unreachable)
    load = mock.Mock(side_effect=OSError('not in the cache'))
    with pytest.raises(TextModelUnavailable, match='cannot be reached'): from_hub(load, 'openai/clip-vit-base-patch32', 'clip')
    assert probes == [(('hub.invalid', 443), 3.)]                     # one probe, bounded by its timeout
    assert [c.kwargs for c in load.call_args_list] == [dict(local_files_only=True)]   # no download tried after it


def test_minilm_real_features(minilm):
    feats, mask = minilm.encode(QATA)
    assert feats.shape == (3, 18, 512) and mask.shape == (3, 18) and feats.dtype == torch.float32
    assert minilm.width == 384 and minilm.proj.weight.shape == (512, 384)
    assert not torch.allclose(feats[0], feats[1], atol=1e-3)
    assert not torch.allclose(feats[1], feats[2], atol=1e-3)
    assert (mask[:, 0] == 1).all() and mask.sum(1).tolist()[0] == 18
    # the same weights give the native features when dim equals the width
    native = TextEncoder('minilm', dim=384)
    assert isinstance(native.proj, nn.Identity)
    f384, _ = native.encode(QATA[:1])
    torch.testing.assert_close(minilm.proj(f384), feats[:1], atol=1e-5, rtol=1e-5)


def test_cache_does_not_rerun_the_model(minilm):
    minilm.clear_cache()
    calls = []
    hook = minilm.backbone.register_forward_hook(lambda *_: calls.append(1))
    try:
        a, ma = minilm.encode(QATA)
        b, mb = minilm.encode([QATA[2], QATA[0], QATA[2]])
        assert len(calls) == 1 and len(minilm._cache) == 3
        torch.testing.assert_close(b, a[[2, 0, 2]]); assert torch.equal(mb, ma[[2, 0, 2]])
        minilm.encode(QATA + ['No infection.'])
        assert len(calls) == 2
    finally: hook.remove()
    # a fresh computation gives the cached value
    ids, mask = minilm.tokenize(QATA[:1])
    torch.testing.assert_close(minilm(ids, mask), a[:1])


def test_frozen_and_always_eval(minilm):
    parent = nn.ModuleDict({'text': minilm, 'head': nn.Linear(512, 1)})
    parent.train()
    assert parent['head'].training
    assert not any(m.training for m in minilm.modules())
    assert not any(p.requires_grad for p in minilm.parameters())
    ids, mask = minilm.tokenize(QATA[:2])
    out = minilm(ids, mask)
    assert not out.requires_grad
    torch.testing.assert_close(out, minilm(ids, mask), rtol=0, atol=0)   # no dropout
    f, _ = minilm.encode(QATA[:1])
    assert not f.requires_grad


def test_tiny_is_deterministic_and_fast():
    torch.manual_seed(123); x = torch.rand(3)
    torch.manual_seed(123); a = TextEncoder('tiny')
    assert torch.equal(torch.rand(3), x)                                   # global RNG untouched
    b = TextEncoder('tiny')
    fa, ma = a.encode(QATA)
    fb, _ = b.encode(QATA)
    torch.testing.assert_close(fa, fb, rtol=0, atol=0)
    assert ma.sum(1).tolist() == [18, 14, 18]
    assert a.tokenizer.unk_token_id not in a.tokenize(QATA)[0]


def test_local_folder(tmp_path):
    "A folder saved from the tiny encoder loads by path and gives the same features"
    tiny = TextEncoder('tiny', dim=32)
    tiny.backbone.save_pretrained(tmp_path); tiny.tokenizer.save_pretrained(tmp_path)
    folder = TextEncoder(str(tmp_path), dim=32)
    torch.testing.assert_close(folder.encode(QATA)[0], tiny.encode(QATA)[0])


def test_clip_from_folder_projects_every_token(tmp_path):
    "pretrained=True reads a CLIP folder; features are the projection of every final-LayerNorm token state"
    cfg = CLIPTextConfig(hidden_size=32, intermediate_size=64, projection_dim=48, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407)
    torch.manual_seed(0)
    CLIPTextModelWithProjection(cfg).save_pretrained(tmp_path)
    clip_tokenizer().save_pretrained(tmp_path)
    for enc in (TextEncoder('clip', path=str(tmp_path), dim=48), TextEncoder(str(tmp_path), dim=48)):
        assert enc.is_clip and enc.width == 48 and isinstance(enc.proj, nn.Identity)
        ids, mask = enc.tokenize(QATA[1:2])
        assert ids[0, mask[0] == 0].tolist() == [0] * int((mask[0] == 0).sum())   # padded with 0
        out = enc.backbone(input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(enc(ids, mask), enc.backbone.text_projection(out.last_hidden_state))
        # the end token's feature is CLIP's pooled sentence embedding
        end = int(mask[0].sum()) - 1
        torch.testing.assert_close(enc(ids, mask)[0, end], out.text_embeds[0])


def test_clip_random_tower():
    enc = TextEncoder('clip', pretrained=False)
    assert sum(p.numel() for p in enc.parameters()) == 63_428_096
    assert enc.logit_scale == 100.
    feats, mask = enc.encode(QATA[:2])
    assert feats.shape == (2, 18, 512) and torch.isfinite(feats).all()


@pytest.mark.skipif(importlib.util.find_spec('ftfy') is None, reason='ftfy (needed by CLIP own tokenizer) missing')
def test_clip_tokenizer_matches_clip_own():
    spec = importlib.util.spec_from_file_location('clip_simple_tokenizer', clip_bpe_file().parent / 'simple_tokenizer.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    own, ours = mod.SimpleTokenizer(), clip_tokenizer()
    for s in QATA + ['Bilateral pulmonary infection, two infected areas, midlle left lung and lower rigth lung.']:
        assert ours(s)['input_ids'][1:-1] == own.encode(s)


@pytest.mark.skipif(not (CXR_TOKENIZER / 'vocab.txt').exists(), reason=f'{CXR_TOKENIZER} not found')
def test_cxr_bert_random_with_its_tokenizer():
    enc = TextEncoder('cxr-bert', pretrained=False, path=str(CXR_TOKENIZER))
    assert enc.width == 768 and enc.proj.weight.shape == (512, 768)
    ids, mask = enc.tokenize(QATA[:1])
    pieces = enc.tokenizer.convert_ids_to_tokens(ids[0])
    assert pieces[:4] == ['[CLS]', 'bilateral', 'pulmonary', 'infection'] and '[UNK]' not in pieces
    assert enc.encode(QATA[:1])[0].shape == (1, 18, 512)


@pytest.mark.skipif(not (CXR_TOKENIZER / 'vocab.txt').exists(), reason=f'{CXR_TOKENIZER} not found')
def test_folder_without_weights_fails_clearly():
    with pytest.raises(TextModelUnavailable, match='cannot load the folder .*save_pretrained'):
        TextEncoder('cxr-bert', path=str(CXR_TOKENIZER))


def test_cxr_bert_random_needs_a_folder(tmp_path):
    with pytest.raises(TextModelUnavailable, match='path=DIR'): TextEncoder('cxr-bert', pretrained=False)


def test_bad_inputs(minilm):
    with pytest.raises(ValueError, match='use one of'): TextEncoder('bert')
    with pytest.raises(TypeError, match='sentence 1 is None'): minilm.encode(['a lung', None])
