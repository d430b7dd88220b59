"""The layout: notebooks are numbered in reading order, so no module imports the module of a later notebook
(imports inside functions included), and the docs config names only files that exist, in that order."""
import ast, re
from pathlib import Path

import pytest
import yaml

import reclmis_nb
from reclmis_nb._modidx import d as MODIDX

PKG = Path(reclmis_nb.__file__).parent
NBS = PKG.parent/'nbs'
MODULES = sorted(m.removeprefix('reclmis_nb.') for m in MODIDX['syms'] if m != 'reclmis_nb._modidx')
MARKER = re.compile(r'^# %% \.\./nbs/(\S+\.ipynb)', re.M)


def notebook_of(module:str) -> str:
    "The notebook `module` is exported from, read from the `# %% ../nbs/X.ipynb` markers nbdev writes"
    names = set(MARKER.findall((PKG/f'{module}.py').read_text()))
    assert len(names) == 1, f'reclmis_nb/{module}.py: its cells should come from one notebook, found {sorted(names) or "none"}'
    return names.pop()


def project_imports(module:str) -> set:
    "Every reclmis_nb module that `module` imports, at the top or inside a function"
    found = set()
    for node in ast.walk(ast.parse((PKG/f'{module}.py').read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1: base = node.module            # from .x import y  /  from . import x
            elif node.module and node.module.split('.')[0] == 'reclmis_nb': base = node.module.removeprefix('reclmis_nb').lstrip('.')
            else: continue
            if base: found.add(base.split('.')[0])
            else: found |= {a.name for a in node.names}         # from reclmis_nb import learner
        elif isinstance(node, ast.Import):
            found |= {a.name.split('.')[1] for a in node.names if a.name.startswith('reclmis_nb.')}
    return (found & set(MODULES)) - {module}


def test_modules_found():
    "The modules the import-order test walks: all of the package's, from _modidx"
    assert {'data', 'model', 'baselines', 'learner', 'profile', 'cli'} <= set(MODULES)
    assert set(MODULES) == {p.stem for p in PKG.glob('*.py')} - {'__init__', '_modidx'}


def test_import_walk_sees_every_form():
    "The walk finds relative, absolute and `import reclmis_nb.x` imports, inside functions too"
    assert {'model', 'baselines', 'learner'} <= project_imports('profile')
    assert {'learner', 'data', 'interpret'} <= project_imports('cli')     # lazy imports inside the commands


@pytest.mark.parametrize('module', MODULES)
def test_imports_run_forward(module):
    "Every project module `module` imports comes from a notebook that sorts (reads) before its own"
    nb = notebook_of(module)
    later = sorted(f'{module} ({nb}) imports {m} ({notebook_of(m)})' for m in project_imports(module) if notebook_of(m) >= nb)
    assert not later, 'imports against the reading order: ' + '; '.join(later)


def _yml(name): return yaml.safe_load((NBS/name).read_text())

def _sidebar_files(contents):
    for c in contents:
        if isinstance(c, str): yield c
        elif isinstance(c, dict):
            if 'href' in c: yield c['href']
            yield from _sidebar_files(c.get('contents', []))


def test_docs_config_files_exist():
    "Every file that _quarto.yml and nbdev.yml name (metadata files, css, sidebar entries) exists"
    q, n = _yml('_quarto.yml'), _yml('nbdev.yml')
    named = list(q.get('metadata-files', []))
    for cfg in (q, n):
        css = (cfg.get('format', {}).get('html') or {}).get('css', [])
        named += [css] if isinstance(css, str) else list(css)
    assert named, '_quarto.yml names no metadata files'
    named += list(_sidebar_files(_yml('sidebar.yml')['website']['sidebar']['contents']))
    missing = [f for f in named if not (NBS/f).exists()]
    assert not missing, f'named in nbs/_quarto.yml, nbdev.yml or sidebar.yml but missing from nbs/: {missing}'


def test_sidebar_follows_reading_order():
    "The sidebar lists the home page, then every numbered notebook in file-name order, then the tutorials"
    entries = list(_sidebar_files(_yml('sidebar.yml')['website']['sidebar']['contents']))
    numbered = [e for e in entries if '/' not in e and e != 'index.ipynb']
    assert entries[0] == 'index.ipynb'
    assert numbered == sorted(p.name for p in NBS.glob('[0-9]*.ipynb')), 'the sidebar should list nbs/NN_*.ipynb in file-name order'
    assert sorted(e for e in entries if e.startswith('tutorials/')) == sorted(f'tutorials/{p.name}' for p in (NBS/'tutorials').glob('*.ipynb'))
