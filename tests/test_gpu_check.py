"tools/gpu_check.py, the prepared GPU check: its dry run does every step on this CPU at tiny size, as a GPU session will at full size."
import json, os, subprocess, sys
from pathlib import Path
import pytest

from reclmis_nb.profile import BENCH_KEYS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO/'tools'/'gpu_check.py'
ENV = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=str(REPO))
STEPS = ['environment', 'smoke', 'bench', 'loader', 'train_epoch', 'cpu_reload', 'compile', 'distributed']

def gpu_check(*args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)

@pytest.fixture(scope='module')
def dry(tmp_path_factory):
    "The dry run with the torch.compile step (eager backend: traced by TorchDynamo, no kernels compiled), ~40 s on 2 cores"
    tmp = tmp_path_factory.mktemp('gpu_check')
    proc = gpu_check('--dry-run', '--compile', '--out', tmp/'dry.json', '--work', tmp/'work')
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp/'dry.json').read_text()), proc

def test_every_step_runs(dry):
    res, proc = dry
    test = {n: s['status'] for n, s in res['steps'].items()}
    assert test == dict.fromkeys(STEPS, 'ok'), test
    assert res['ok'] and res['dry_run'] and res['device'] == 'cpu'
    assert '8 of 8 steps ok or skipped' in proc.stdout

def test_figures(dry):
    s = dry[0]['steps']
    assert set(BENCH_KEYS) <= set(s['bench']) and s['bench']['device'] == 'cpu'
    assert s['bench']['preset'] == 'qata' and s['bench']['bs'] == 4           # the qata architecture, tiny widths, the tiny batch
    assert (s['smoke']['logits_dtype'], s['smoke']['loss_ccl_dtype'], s['smoke']['loss_seg_dtype']) == ('bfloat16', 'float32', 'float32')
    assert s['train_epoch']['train_images'] == 8 and 0 <= s['train_epoch']['valid_dice'] <= 1
    assert s['cpu_reload']['tensors_on'] == ['cpu']
    assert s['cpu_reload']['max_prob_diff'] == 0 and s['cpu_reload']['dice_cpu'] == s['cpu_reload']['dice_device']  # both on the CPU here
    assert s['compile']['backend'] == 'eager' and s['compile']['compile_train_s'] > 0
    assert s['compile']['second_epoch_s'] > 0 and s['compile']['eager_epoch_s'] == s['train_epoch']['epoch_s'] and 0 <= s['compile']['valid_dice'] <= 1
    assert s['distributed']['backend'] == 'gloo' and s['distributed']['ranks'] == 2
    assert s['loader']['images'] == 8 and s['loader']['pin_memory'] is False  # pinned memory only with CUDA

def test_usage_mistakes(tmp_path):
    "One line on stderr, exit code 2, and no JSON written"
    for args, says in ((['--out', tmp_path/'x.json'], '--data DATASET is needed'),
                       (['--data', tmp_path/'nowhere', '--out', tmp_path/'x.json'], 'nowhere not found'),
                       (['--dry-run', '--data', tmp_path, '--out', tmp_path/'x.json'], 'leave out --data')):
        proc = gpu_check(*args, timeout=60)
        assert proc.returncode == 2 and says in proc.stderr and 'Traceback' not in proc.stderr, proc.stderr
    assert not (tmp_path/'x.json').exists()

def test_no_gpu_here(tmp_path, capsys):
    "Without --dry-run on a machine with no GPU: one line naming the way out (run in this process: no second start of torch)"
    import importlib.util, torch
    if torch.cuda.is_available(): pytest.skip('this machine has a CUDA GPU')
    spec = importlib.util.spec_from_file_location('gpu_check', SCRIPT)
    spec.loader.exec_module(gpu := importlib.util.module_from_spec(spec))
    assert gpu.main(['--data', str(tmp_path), '--out', str(tmp_path/'x.json')]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith('gpu_check: error:') and '--dry-run' in err, err
    assert not (tmp_path/'x.json').exists()
