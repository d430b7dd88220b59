"tools/vs_release.py, ours against the release side by side: its skip path and argument handling (no release needed)."
import os, subprocess, sys
from pathlib import Path
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO/'tools'/'vs_release.py'
ENV = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=str(REPO))

def vs_release(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=ENV, timeout=120)

def test_skips_without_the_release(tmp_path):
    "A folder without release_cpu.py: one line saying so, exit 0, nothing built"
    proc = vs_release(tmp_path/'no-such-reference', '--json')
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [f'vs_release: skipped: {tmp_path/"no-such-reference"} has no release_cpu.py '
                                                '(give the folder holding the release, e.g. ../shared/reference)']
    assert proc.stderr == ''

@pytest.mark.parametrize('args, says', [(['--rounds', '0'], "argument --rounds: '0': give a whole number >= 1"),
                                        (['--threads', 'two'], "argument --threads: 'two': give a whole number >= 1"),
                                        (['--config', 'monuseg'], "--config: invalid choice: 'monuseg'"),
                                        ([], None)])
def test_arguments(tmp_path, args, says):
    "Counts below 1, words for numbers and unknown configs are refused by argparse (exit 2) before the folder is looked at"
    proc = vs_release(*(args or ['--reps', '1']), tmp_path)
    if says is None: assert proc.returncode == 0 and 'skipped' in proc.stdout  # valid arguments reach the skip
    else:
        assert proc.returncode == 2 and says in proc.stderr, proc.stderr
        assert 'Traceback' not in proc.stderr and proc.stdout == ''

def test_the_release_missing_a_package(tmp_path):
    "A release folder whose harness imports a package this python lacks: exit 3, one line naming the package"
    (tmp_path/'release_cpu.py').write_text('import no_such_package_for_the_release\n')
    (tmp_path/'reclmis-release'/'nets').mkdir(parents=True)
    proc = vs_release(tmp_path, '--clip', tmp_path/'release_cpu.py')
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"vs_release: the release needs the package 'no_such_package_for_the_release', which {sys.executable} lacks: "
        'make the venv the docstring of tools/vs_release.py describes and run the script with its python']
