"Shared pytest fixtures: paths to the optional real data beside the repository."
import os
from pathlib import Path
import pytest
import torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / 'shared' / 'data'
QATA = SHARED_DATA / 'qata-sgseg'

def cli(capsys, *argv):
    "Exit code, stdout, stderr of `reclmis argv` (argparse's own refusals included)"
    from reclmis_nb.cli import main
    try: rc = main([str(a) for a in argv])
    except SystemExit as e: rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err

@pytest.fixture
def qata_root():
    "The real QaTa subset in ../shared/data, or skip with the reason"
    if not (QATA / 'prompts' / 'annotation.json').exists():
        pytest.skip(f'real QaTa data not found at {QATA}')
    return QATA

@pytest.fixture(scope='module')
def synth(request, tmp_path_factory):
    "A small generated dataset, 8 train / 4 valid / 4 test at 48x48; a test module changes it with `SYNTH = dict(...)`"
    from reclmis_nb.synthetic import make_synthetic_dataset
    kw = dict(n_train=8, n_valid=4, n_test=4, size=48, seed=0) | getattr(request.module, 'SYNTH', {})
    return make_synthetic_dataset(tmp_path_factory.mktemp('data')/'synth', **kw)

@pytest.fixture(scope='module')
def one_thread():
    "Tiny tensors: one thread is fastest, and immune to OpenMP spin-waiting on a busy machine"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
