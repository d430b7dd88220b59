"""Re-execute notebooks with every cell, `#| slow` ones included, and save their outputs in place.

    python tools/run_notebooks.py                      # every notebook in nbs/ (not the tutorials)
    python tools/run_notebooks.py nbs/10d_training.ipynb nbs/tutorials/qata_cpu.ipynb

Each notebook runs in its own folder in a fresh kernel, without `IN_TEST` (so the full-size paths run), offline
(`HF_HUB_OFFLINE=1`). Cells flagged `#| eval: false` are never run, `#| gpu` ones only when CUDA is available;
both keep the outputs they had. A notebook that fails is left as it was and the command exits 1.
Afterwards the notebooks are cleaned with `nbdev-clean`, as CI requires. See CONTRIBUTING.md for when to run it.
"""
import os, subprocess, sys, time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
SKIP_TAG = 'skip-execution'

def has_cuda():
    try: import torch; return torch.cuda.is_available()
    except ImportError: return False

def skipped(cell, cuda):
    "Whether a code cell must not run here"
    first = {l.strip() for l in cell.source.splitlines() if l.startswith('#|')}
    return '#| eval: false' in first or ('#| gpu' in first and not cuda)

def run(path, cuda):
    "Execute one notebook in place; returns the seconds it took"
    nb = nbformat.read(path, as_version=4)
    marked = [c for c in nb.cells if c.cell_type == 'code' and skipped(c, cuda)]
    for c in marked: c.metadata.setdefault('tags', []).append(SKIP_TAG)
    t0 = time.time()
    NotebookClient(nb, timeout=None, kernel_name='python3', skip_cells_with_tag=SKIP_TAG,
                   resources={'metadata': {'path': str(path.parent)}}).execute()
    for c in marked:
        c.metadata['tags'].remove(SKIP_TAG)
        if not c.metadata['tags']: del c.metadata['tags']
    nbformat.write(nb, path)
    return time.time() - t0

def main(args):
    paths = [Path(a).resolve() for a in args] or sorted((ROOT/'nbs').glob('[0-9]*.ipynb')) + [ROOT/'nbs'/'index.ipynb']
    if missing := [p for p in paths if not p.is_file()]: sys.exit(f'run_notebooks: {missing[0]} not found')
    os.environ.update(HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', PYTHONUNBUFFERED='1')
    for k in ('IN_TEST', 'MPLBACKEND'): os.environ.pop(k, None)   # the full paths; figures inline
    cuda, failed = has_cuda(), []
    for p in paths:
        try: print(f'{p.relative_to(ROOT)}: {run(p, cuda):.0f} s', flush=True)
        except CellExecutionError as e:
            failed.append(p)
            print(f'{p.relative_to(ROOT)}: FAILED, left unchanged: {e.ename}: {e.evalue}'[:400], flush=True)
            print(str(e)[:3000], flush=True)
    subprocess.run(['nbdev-clean'], cwd=ROOT, check=True)
    if failed: sys.exit(1)

if __name__ == '__main__': main(sys.argv[1:])
