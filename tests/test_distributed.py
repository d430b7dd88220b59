"Data-parallel training for real: two gloo processes on this CPU, started by torchrun, on generated data."
import csv, json, os, re, socket, subprocess, sys
import pytest
import torch

from reclmis_nb.evaluation import evaluate

KEYS = ('dice', 'iou', 'dice_global', 'iou_global')
ENV = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
TRAIN = ['--preset', 'tiny', '--bs', '4', '--lr', '1e-2', '--epochs', '5', '--quiet']

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def torchrun(*args, timeout=120):
    "Two processes on 127.0.0.1 running `args` (a script, or `-m module ...`)"
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc-per-node', '2', '--master-addr', '127.0.0.1',
           '--master-port', str(free_port()), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)

def rank_lines(proc):
    "The start lines of the ranks (searched anywhere: the processes share one stdout, lines may interleave)"
    return sorted(re.findall(r'rank \d of \d(?= \()', proc.stdout))

def history(run):
    with open(run/'history.csv') as f: return list(csv.DictReader(f))

SYNTH = dict(n_valid=5, n_test=2, size=32, seed=1)  # conftest's `synth`: 5 valid images do not divide by 2 ranks, so rank 1 repeats one

@pytest.fixture(scope='module')
def run(synth, tmp_path_factory):
    "`reclmis train --distributed 2`: 5 epochs of the tiny preset"
    out = tmp_path_factory.mktemp('runs')/'full'
    proc = subprocess.run(['reclmis', 'train', '--distributed', '2', '--data', str(synth), '--out', str(out), *TRAIN],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc

SCRIPT = r'''
import json, sys, torch
from pathlib import Path
from fastai.basics import rank_distrib
from reclmis_nb.distributed import setup_distributed, from_rank0, built_once, sum_over_ranks, shard_bs
setup_distributed(torch.device('cpu'))
r, out = rank_distrib(), Path(sys.argv[1])
calls = []
def build():
    calls.append(r)
    return {'cap': (torch.full((2,), float(r + 7)), torch.ones(2, dtype=torch.long))}
table = built_once(out/'feats.pt', build)
try: from_rank0(lambda: 1 / r)
except ZeroDivisionError as e: err = type(e).__name__
(out/f'rank{r}.json').write_text(json.dumps(dict(
    folder=from_rank0(lambda: f'made by rank {r}'), err=err, calls=calls, feats=table['cap'][0].tolist(),
    sums=sum_over_ranks(r + 0.5, 1), bs=shard_bs(8))))
torch.distributed.destroy_process_group()
'''

def test_helpers_agree_across_ranks(tmp_path):
    (tmp_path/'helpers.py').write_text(SCRIPT)
    proc = torchrun(tmp_path/'helpers.py', tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path/f'rank{r}.json').read_text()) for r in (0, 1))
    assert r0['folder'] == r1['folder'] == 'made by rank 0'
    assert r0['err'] == r1['err'] == 'ZeroDivisionError'        # rank 0 failed: both raise
    assert r0['calls'] == [0] and r1['calls'] == []              # the text features are built once
    assert r0['feats'] == r1['feats'] == [7., 7.]
    assert r0['sums'] == r1['sums'] == [0.5 + 1.5, 2]
    assert r0['bs'] == r1['bs'] == 4

def test_both_ranks_train_and_only_rank0_writes(run):
    out, proc = run
    assert rank_lines(proc) == ['rank 0 of 2', 'rank 1 of 2']
    assert proc.stdout.count("preset 'tiny' on cpu") == 1          # the configuration, printed by rank 0 only
    assert proc.stdout.count('run folder:') == 1
    assert sorted(p.name for p in out.iterdir()) == ['best.pth', 'history.csv', 'last.pth', 'run.json', 'text_features.pt']
    assert [int(r['epoch']) for r in history(out)] == list(range(5))
    ck = torch.load(out/'last.pth', weights_only=True)
    assert ck['epochs_done'] == 5 and ck['recipe']['bs'] == 4 and len(ck['history']) == 5

def test_gathered_metrics_equal_single_process_evaluation(run, synth):
    out, _ = run
    rows = history(out)
    last = {k: float(rows[-1][k]) for k in KEYS}
    assert last['dice'] > 0, 'the model predicts nothing: the comparison would be vacuous'
    single = evaluate(out/'last.pth', synth, split='valid')
    assert single['n'] == 5
    for k in KEYS: assert single[k] == pytest.approx(last[k], abs=1e-6), k
    best = torch.load(out/'best.pth', weights_only=True)
    single_best = evaluate(out/'best.pth', synth, split='valid')
    assert single_best['dice'] == pytest.approx(best['best'], abs=1e-6)

def test_resume_distributed_continues_the_run(run, synth, tmp_path):
    full, _ = run
    out = tmp_path/'run'
    first = torchrun('-m', 'reclmis_nb.cli', 'train', '--data', synth, '--out', out, '--stop-after', '3', *TRAIN)
    assert first.returncode == 0, first.stderr[-3000:]
    assert torch.load(out/'last.pth', weights_only=True)['epochs_done'] == 3
    second = torchrun('-m', 'reclmis_nb.cli', 'train', '--resume', out, '--quiet')
    assert second.returncode == 0, second.stderr[-3000:]
    assert rank_lines(second) == ['rank 0 of 2', 'rank 1 of 2']
    rows, ref = history(out), history(full)
    assert [int(r['epoch']) for r in rows] == list(range(5))
    for a, b in zip(rows, ref):                                  # interrupted + resumed = uninterrupted
        for k in ('train_seg', *KEYS): assert float(a[k]) == pytest.approx(float(b[k]), abs=1e-5), (a['epoch'], k)

def test_distributed_flag_is_refused_under_a_launcher(monkeypatch, capsys):
    from reclmis_nb.cli import main
    monkeypatch.setenv('WORLD_SIZE', '2')
    assert main(['train', '--distributed', '2', '--data', 'anywhere']) == 2
    assert 'leave it out under a launcher' in capsys.readouterr().err
