#!/usr/bin/env python
"""Ours against the authors' release, side by side: one process, the same inputs, interleaved rounds.

    python tools/vs_release.py RELEASE_DIR [--config qata] [--threads 2] [--rounds 2] [--reps 3] [--json] [--profile N] [--channels-last] [--compile]

RELEASE_DIR is the folder that holds `release_cpu.py`, `reclmis-release/` (the release, unmodified) and `shims/`
(here `../shared/reference`). Both models are built with random weights (`torch.manual_seed(0)`): ours from
`get_preset(config, text_pretrained=False)`, the release through `release_cpu.build(config)`. Timed, each as its
own code does it, on the same images, masks and CLIP token ids:

- training step, batch 2: forward, losses, backward, Adam step. Ours: `model.total_loss(model(images, E_clip,
  mask), masks)` with the frozen text features computed once (the learner caches them per caption) and the
  learner's optimizer (`recipes.torch_adam`: torch's Adam, its fused kernel); the release, with `torch.optim.Adam` as its `train_model.py`:
  `model(images, masks, tokens, token_mask)` (CLIP inside, its auxiliary branch on), `WeightedDiceBCE(0.5, 0.5)` and
  the weighted sum of its config's `loss_weight`, as its `Train_one_epoch.py` does;
- inference, batch 1, under `torch.no_grad()`: ours `fast(image, text_encoder(ids, mask), mask)` with
  `fast = evaluation.inference_copy(model)` (BatchNorm folded, channels-last weights: what `evaluate` scores; made
  once, untimed), the release `model(..., mode='test')` in eval mode (its auxiliary branch on, as shipped).

`--compile` also times, in the same rounds, ours compiled by `learner.compile_model` (inductor, convolutions
in NCHW, as `reclmis train --compile` trains): a copy of the same model and of its inference copy, each compiled on
its warm-up call (the seconds that took are printed), and gives its step and inference against the release's and
against ours eager.

`--channels-last` also times, in the same rounds, ours with channels-last weights and maps (a copy of the same
model: the recipe's `channels_last` switch, what `reclmis train --channels-last` does; faster convolutions, but
outputs that round further from the release's, see `tests/test_release.py::test_training_case`), and gives its
step against the release's and against ours in the default layout, which the paper recipes train in.

Each round times every code (`--reps` calls each, median; one untimed warm-up call first in round 1), ours first
in odd rounds and last in even ones (ours, the release, ours channels-last, ours compiled, then the reverse), so a change of load
on the machine falls on all of them. The table
gives each round's medians and the ratio ours / release per round; the load average before and after is printed
with them, as a ratio holds only for a machine that was equally busy for both. The CPU time of the process
(`time.process_time`, both threads) is given too: on a machine shared with other work it moves less than the
wall time (run with OMP_WAIT_POLICY=PASSIVE, so that waiting threads sleep instead of spinning).

The release needs packages the library does not (opencv, timm, einops, ml_collections, absl); they go into a
venv of their own that sees the project's venv, so that one python imports both (commands used here, with the
local package index; elsewhere drop the --index-url):

    python3 -m venv /tmp/relvenv
    /tmp/venv/bin/python -c "import site; print(site.getsitepackages()[0])" \\
        > /tmp/relvenv/lib/python3.11/site-packages/project-venv.pth
    /tmp/relvenv/bin/python -m pip install --no-deps --index-url file:///opt/pypi/simple \\
        "opencv-python-headless<5" timm einops ml-collections absl-py
    PYTHONPATH=. /tmp/relvenv/bin/python tools/vs_release.py ../shared/reference

The release loads CLIP from `reclmis-release/nets/ViT-B-32.pt`. When RELEASE_DIR has none (the shared folder is
read-only), the folder is copied to a temporary directory and a CLIP state dict is written there from
`--manifest` (default RELEASE_DIR/../release-parity/manifest-<config>.json, through that folder's
`make_state_dict.clip_state_dict`), or taken from `--clip FILE`; the release's files are not changed.

`--profile N` also runs `torch.profiler` on one training step and one inference of each and prints the N
operators with the most self CPU time.

Exit codes: 0 done, or skipped with one line when RELEASE_DIR is absent; 2 a usage mistake; 3 the release cannot
be built here (a missing package or CLIP file, one line saying what to do).
"""
import argparse, copy, importlib.util, json, os, shutil, statistics, sys, tempfile, time
from pathlib import Path

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

SENTENCE = 'Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.'


def parse(argv=None):
    from reclmis_nb.cli import at_least_1  # the CLI's own count type
    ap = argparse.ArgumentParser(prog='vs_release.py', description=__doc__.splitlines()[0])
    ap.add_argument('release_dir', type=Path, help='folder with release_cpu.py, reclmis-release/ and shims/ (../shared/reference)')
    ap.add_argument('--config', default='qata', choices=['qata', 'mosmed'], help='the paper configuration to build')
    ap.add_argument('--threads', type=at_least_1, default=2, help='torch threads for both')
    ap.add_argument('--rounds', type=at_least_1, default=2, help='interleaved rounds')
    ap.add_argument('--reps', type=at_least_1, default=3, help='timed calls of each kind per round (median)')
    ap.add_argument('--json', action='store_true', help='print one JSON object instead of the table')
    ap.add_argument('--channels-last', action='store_true', help="also time ours training with channels-last weights and maps (the recipe's "
                    '`channels_last` switch), in the same rounds')
    ap.add_argument('--compile', action='store_true', help='also time ours compiled (inductor, `reclmis train --compile`), in the same rounds')
    ap.add_argument('--profile', type=int, default=0, metavar='N', help='also print the N top operators by self CPU time')
    ap.add_argument('--clip', type=Path, help='a CLIP ViT-B/32 state-dict file for the release (default: from --manifest)')
    ap.add_argument('--manifest', type=Path, help='release-parity manifest to regenerate CLIP from '
                    '(default RELEASE_DIR/../release-parity/manifest-CONFIG.json)')
    return ap.parse_args(argv)


def fail(code, msg):
    print(f'vs_release: {msg}', file=sys.stderr)
    sys.exit(code)


def release_folder(a, tmp):
    "RELEASE_DIR itself when it has the CLIP file, else a copy with one written into it"
    clip_path = a.release_dir / 'reclmis-release' / 'nets' / 'ViT-B-32.pt'
    if clip_path.exists() and not a.clip: return a.release_dir
    if not clip_path.parent.is_dir(): fail(3, f'{clip_path.parent} is missing: RELEASE_DIR must hold the release as reclmis-release/')
    import torch
    copy = Path(tmp) / 'reference'
    shutil.copytree(a.release_dir, copy)
    target = copy / 'reclmis-release' / 'nets' / 'ViT-B-32.pt'
    if a.clip:
        if not a.clip.is_file(): fail(3, f'--clip {a.clip}: no such file; give a CLIP ViT-B/32 state dict')
        shutil.copyfile(a.clip, target)
        return copy
    manifest = a.manifest or a.release_dir.parent / 'release-parity' / f'manifest-{a.config}.json'
    if not manifest.is_file():
        fail(3, f'{clip_path} is missing and so is the manifest {manifest}: pass --clip FILE or --manifest FILE')
    sys.path.insert(0, str(manifest.parent))
    from make_state_dict import clip_state_dict
    torch.save(clip_state_dict(str(manifest)), target)
    return copy


def load_release_cpu(folder):
    "The harness module `release_cpu` of `folder` (it puts the release and its shims on sys.path)"
    spec = importlib.util.spec_from_file_location('release_cpu', folder / 'release_cpu.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def inputs(te, B, seed):
    "Images in [0, 1], masks in {0, 1} (B, 1, 224, 224) and CLIP token ids with their mask, from one generator"
    import torch
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(B, 3, 224, 224, generator=g)
    masks = (torch.rand(B, 1, 224, 224, generator=g) > 0.7).float()
    ids, am = te.tokenize([SENTENCE] * B)
    return images, masks, ids, am


def build(a, folder):
    """Both models and their four timed calls: {'ours'|'release': {'train': fn, 'infer': fn}}, with --channels-last also
    {'ours_nhwc': {'train': fn}}, with --compile {'ours_compiled': {'train': fn, 'infer': fn}}"""
    import numpy as np, torch
    try: rc = load_release_cpu(folder)  # first: a missing package is said before the library's imports
    except ModuleNotFoundError as e:
        fail(3, f'the release needs the package {e.name!r}, which {sys.executable} lacks: make the venv the docstring '
                'of tools/vs_release.py describes and run the script with its python')
    from reclmis_nb.model import RecLMIS, get_preset
    from reclmis_nb.recipes import torch_adam
    from reclmis_nb.evaluation import inference_copy
    from reclmis_nb.learner import compile_model
    torch.manual_seed(0); np.random.seed(0)
    ours = RecLMIS(get_preset(a.config, text_pretrained=False), verbose=False)
    te = ours.text_encoder
    torch.manual_seed(0); np.random.seed(0)
    rel, gc, _ = rc.build(a.config)
    from utils import WeightedDiceBCE  # the release's own loss (its folder is on sys.path now)
    crit = WeightedDiceBCE(0.5, 0.5)

    images, masks, ids, am = inputs(te, 2, 1)
    image1, _, ids1, am1 = inputs(te, 1, 2)
    with torch.no_grad(): feats = te(ids, am)
    adam = lambda m: torch_adam([p for p in m.parameters() if p.requires_grad], lr=3e-4)  # the learner's optimizer
    opt_r = torch.optim.Adam([p for p in rel.parameters() if p.requires_grad], lr=3e-4)
    tok, tmask, tok1, tmask1 = ids.int(), am.int(), ids1.int(), am1.int()

    def train_step(model, opt):
        def step():
            model.train(); opt.zero_grad()
            model.total_loss(model(images, feats, am), masks).backward()
            opt.step()
        return step
    ours_train = train_step(ours, adam(ours))
    def infer(fast):
        def call():
            with torch.no_grad(): fast(image1, te(ids1, am1), am1)
        return call
    ours_infer = infer(inference_copy(ours))
    def release_train():
        rel.train(); opt_r.zero_grad()
        probs, losses = rel(images, masks, tok, tmask)
        losses['loss_criterion'] = crit(probs, masks)
        loss = sum(gc.loss_weight[k] * v.mean() for k, v in losses.items())
        loss.backward(); opt_r.step()
        if not rel.aux: fail(3, 'the release switched its auxiliary branch off (its bare except caught an error)')
    def release_infer():
        rel.eval()
        with torch.no_grad(): rel(image1, masks[:1], tok1, tmask1, mode='test')
    calls = dict(ours=dict(train=ours_train, infer=ours_infer), release=dict(train=release_train, infer=release_infer))
    if a.channels_last:  # the same weights channels-last, as `recl_learner` trains with the recipe's switch
        nhwc = copy.deepcopy(ours).to(memory_format=torch.channels_last)
        calls['ours_nhwc'] = dict(train=train_step(nhwc, adam(nhwc)))
    if a.compile:  # a copy compiled as `reclmis train --compile` trains, and its inference copy compiled
        comp = compile_model(copy.deepcopy(ours))
        calls['ours_compiled'] = dict(train=train_step(comp, adam(comp)),
                                      infer=infer(compile_model(inference_copy(ours))))
    return calls


def median_seconds(fn, reps):
    "(median wall seconds, median CPU seconds of this process) of `reps` calls"
    ts, cs = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time(); fn()
        ts.append(time.perf_counter() - t); cs.append(time.process_time() - c)
    return statistics.median(ts), statistics.median(cs)


def profile(calls, n):
    "The n operators with the most self CPU time in one call of each kind, per code"
    from torch.profiler import profile as tprofile, ProfilerActivity
    out = {}
    for who, kinds in calls.items():
        for kind, fn in kinds.items():
            with tprofile(activities=[ProfilerActivity.CPU]) as p: fn()
            out[f'{who} {kind}'] = p.key_averages().table(sort_by='self_cpu_time_total', row_limit=n)
    return out


def run(a):
    import torch
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix='vs_release_') as tmp:
        folder = release_folder(a, tmp)
        calls = build(a, folder)
        load_before, first_call_s = os.getloadavg(), {}
        for who, kinds in calls.items():
            for kind, fn in kinds.items():  # warm-up: first-call allocations, lazy initialisation, compiling
                t0 = time.perf_counter(); fn(); first_call_s[f'{who}_{kind}'] = time.perf_counter() - t0
        rounds = []
        for r in range(a.rounds):
            order = list(calls) if r % 2 == 0 else list(calls)[::-1]
            t = {}
            for kind in ('train', 'infer'):
                for who in order:
                    if kind in calls[who]: t[f'{who}_{kind}_s'], t[f'{who}_{kind}_cpu_s'] = median_seconds(calls[who][kind], a.reps)
            for kind in ('train', 'infer'):
                t[f'{kind}_ratio'] = t[f'ours_{kind}_s'] / t[f'release_{kind}_s']
                t[f'{kind}_cpu_ratio'] = t[f'ours_{kind}_cpu_s'] / t[f'release_{kind}_cpu_s']
            for who in set(calls) - {'ours', 'release'}:  # a variant of ours: against the release and against ours
                for kind in calls[who]:
                    t[f'{who}_{kind}_ratio'] = t[f'{who}_{kind}_s'] / t[f'release_{kind}_s']
                    t[f'{who}_vs_ours_{kind}'] = t[f'{who}_{kind}_s'] / t[f'ours_{kind}_s']
            rounds.append(t)
        load_after = os.getloadavg()
        profiles = profile(calls, a.profile) if a.profile > 0 else {}
    return dict(config=a.config, channels_last=a.channels_last, compile=a.compile, first_call_s=first_call_s, threads=torch.get_num_threads(), torch=torch.__version__, rounds=rounds, reps=a.reps,
                train_batch=2, infer_batch=1, image_size=224,
                **{f'{k}_max': max(t[k] for t in rounds) for k in ('train_ratio', 'infer_ratio', 'train_cpu_ratio', 'infer_cpu_ratio')},
                loadavg_before=load_before, loadavg_after=load_after, profiles=profiles)


def table(res):
    rs = res['rounds']
    f = lambda k: ', '.join(f'{t[k]:.3f} s' for t in rs)
    g = lambda k: ', '.join(f'{t[k]:.2f}x' for t in rs)
    la = lambda v: ' '.join(f'{x:.2f}' for x in v)
    lines = [f"RecLMIS {res['config']!r} ours vs release, {res['threads']} threads, torch {res['torch']}, "
             f"{len(rs)} interleaved rounds (median of {res['reps']} each)",
             f"| | ours | release | ours / release |", '|---|---|---|---|',
             f"| training step, batch 2, 224x224 | {f('ours_train_s')} | {f('release_train_s')} | {g('train_ratio')} |",
             f"| inference, batch 1 | {f('ours_infer_s')} | {f('release_infer_s')} | {g('infer_ratio')} |",
             f"| training step, CPU time | {f('ours_train_cpu_s')} | {f('release_train_cpu_s')} | {g('train_cpu_ratio')} |",
             f"| inference, CPU time | {f('ours_infer_cpu_s')} | {f('release_infer_cpu_s')} | {g('infer_cpu_ratio')} |",
             *([f"| training step, ours channels-last | {f('ours_nhwc_train_s')} | {f('release_train_s')} | {g('ours_nhwc_train_ratio')} "
                f"(ours channels-last / ours: {g('ours_nhwc_vs_ours_train')}) |"] if res['channels_last'] else []),
             *([f"| {what}, ours compiled | {f(f'ours_compiled_{kind}_s')} | {f(f'release_{kind}_s')} | {g(f'ours_compiled_{kind}_ratio')} "
                f"(ours compiled / ours: {g(f'ours_compiled_vs_ours_{kind}')}) |" for kind, what in (('train', 'training step'), ('infer', 'inference'))]
               if res['compile'] else []),
             *([f"compiling (first calls): training {res['first_call_s']['ours_compiled_train']:.0f} s, "
                f"inference {res['first_call_s']['ours_compiled_infer']:.0f} s"] if res['compile'] else []),
             f"load average (1, 5, 15 min) before {la(res['loadavg_before'])}, after {la(res['loadavg_after'])}"]
    for k, v in res['profiles'].items(): lines += ['', f'top operators by self CPU time: {k}', v]
    return '\n'.join(lines)


def main(argv=None):
    a = parse(argv)
    if not (a.release_dir / 'release_cpu.py').is_file():
        print(f'vs_release: skipped: {a.release_dir} has no release_cpu.py (give the folder holding the release, '
              'e.g. ../shared/reference)')
        return 0
    res = run(a)
    print(json.dumps(res) if a.json else table(res))
    return 0


if __name__ == '__main__':
    sys.exit(main())
