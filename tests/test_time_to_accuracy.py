"tools/time_to_accuracy.py: the summary of a history, usage errors, and a two-seed tiny run that resumes instead of retraining."
import csv, importlib.util, json, sys
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location('time_to_accuracy', REPO/'tools'/'time_to_accuracy.py')
tta = importlib.util.module_from_spec(spec); spec.loader.exec_module(tta)

pytestmark = pytest.mark.usefixtures('one_thread')

def test_summarise():
    "Dyadic Dice values, so that every difference below is exact in binary floating point"
    rows = [dict(dice=d, seconds=s) for d, s in [(0.5, 10), (0.875, 12), (0.625, 11), (0.75, 9)]]
    r = tta.summarise(rows, 0.75)
    assert r['epoch_reached'] == 2 and r['seconds_to_target'] == 22
    assert r['worst_drop'] == 0.25 and r['best'] == 0.875 and r['final'] == 0.75 and r['total_seconds'] == 42
    never = tta.summarise(rows, 0.9)
    assert never['epoch_reached'] is None and never['seconds_to_target'] is None
    assert tta.summarise(rows[:1])['worst_drop'] == 0  # one epoch: nothing to fall below

def test_parse_sets():
    assert tta.parse_sets(['warmup=1', 'lr=2e-3', 'augment=null', 'schedule=cosine']) == dict(warmup=1, lr=0.002, augment=None, schedule='cosine')
    with pytest.raises(ValueError, match="write FIELD=VALUE"): tta.parse_sets(['warmup'])

@pytest.mark.parametrize('args, says', [(['--set', 'warmpu=1'], "unknown fields ['warmpu']"),
                                        (['--set', 'seed=1'], 'give the seeds with --seeds'),
                                        (['--preset', 'huge'], "unknown preset 'huge'")])
def test_usage_errors(args, says, tmp_path, capsys):
    "Refused in one line, before any training"
    assert tta.main([str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())

def test_two_seeds_then_resume(synth, tmp_path, capsys):
    out = tmp_path/'tta'
    args = [str(synth), '--preset', 'tiny', '--seeds', '1', '2', '--set', 'epochs=1', '--target', '0', '--threads', '1', '--out', str(out), '--json']
    assert tta.main(args) == 0
    res = json.loads(capsys.readouterr().out)
    for s in ('1', '2'):
        with open(out/f'seed-{s}'/'history.csv') as f: rows = list(csv.DictReader(f))
        assert res['seeds'][s]['dice'] == [float(r['dice']) for r in rows]
        assert res['seeds'][s]['epoch_reached'] == 1 and res['seeds'][s]['seconds_to_target'] == float(rows[0]['seconds'])
    assert res['all_reached'] and res['set'] == {'epochs': 1}
    assert json.loads((out/'seed-2'/'run.json').read_text())['recipe']['seed'] == 2
    stamp = (out/'seed-1'/'last.pth').stat().st_mtime_ns
    assert tta.main(args) == 0  # finished runs are read, not trained again
    assert json.loads(capsys.readouterr().out)['seeds'] == res['seeds']
    assert (out/'seed-1'/'last.pth').stat().st_mtime_ns == stamp
