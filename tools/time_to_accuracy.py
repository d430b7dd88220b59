#!/usr/bin/env python
"""Time to accuracy: train a recipe with several seeds and report, per seed, when validation Dice first reaches a
target and how far it ever fell below its best so far.

    python tools/time_to_accuracy.py DATA [--preset small] [--seeds 3407 1 2] [--threads 2] [--target 0.75]
                                     [--set warmup=1 clip=1.0 ...] [--out DIR] [--json]

Each seed is one `training.train` run (`reclmis train --data DATA --preset P` with `seed` and the `--set` recipe
fields changed), in DIR/seed-<seed> (default runs/tta-<preset>-<timestamp>). The runs go one after the other, so
each has the machine to itself; the figures are the runs' own `history.csv` (validation Dice and wall seconds of
every epoch, validation included). "Seconds to target" is the sum of the epochs' seconds up to the first epoch
whose validation Dice reaches the target (the text features, encoded once before the first epoch, are not in it);
"worst drop" is the largest amount by which an epoch's Dice fell below the best of the epochs before it.

An interrupted call resumes: a seed whose folder holds a finished run is read, not retrained; one that holds an
unfinished run is resumed (`train --resume`). The load average before and after is printed: seconds hold only
for a machine that had nothing else to do.

Exit codes: 0 done; 2 a usage mistake (one line).
"""
import argparse, contextlib, csv, json, os, sys, time
from pathlib import Path

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')


def summarise(rows,         # history.csv rows (dicts with 'dice' and 'seconds')
              target=0.75): # validation Dice to reach
    "Dice and seconds per epoch, seconds and epoch at which Dice first reaches `target` (None: never), worst drop below the best so far"
    dice = [float(r['dice']) for r in rows]
    secs = [float(r['seconds']) for r in rows]
    reached = next((i for i, d in enumerate(dice) if d >= target), None)
    drops = [max(dice[:i]) - d for i, d in enumerate(dice) if i]
    return dict(dice=dice, seconds=secs, target=target, epoch_reached=None if reached is None else reached + 1,
                seconds_to_target=None if reached is None else sum(secs[:reached + 1]),
                worst_drop=max([0.] + drops), best=max(dice), final=dice[-1], total_seconds=sum(secs))


def parse_sets(items):
    "['warmup=1', 'lr=2e-3', 'augment=null'] -> {'warmup': 1, 'lr': 0.002, 'augment': None} (values read as JSON, else text)"
    out = {}
    for it in items:
        if '=' not in it: raise ValueError(f'--set {it!r}: write FIELD=VALUE, e.g. warmup=1')
        k, v = it.split('=', 1)
        try: out[k] = json.loads(v)
        except json.JSONDecodeError: out[k] = v
    return out


def run_seed(data, preset, seed, out, sets):
    "The run folder of `seed`: trained, resumed, or (finished) left as it is"
    from reclmis_nb.training import train
    from reclmis_nb.release import read_checkpoint
    last = out/'last.pth'
    if last.exists():
        ck = read_checkpoint(last)
        if ck['epochs_done'] >= ck['recipe']['epochs']: return out
        return train(resume=out, progress=False)
    return train(data, preset, seed=seed, out=out, progress=False, **sets)


def main(argv=None):
    ap = argparse.ArgumentParser(prog='time_to_accuracy.py', description=__doc__.splitlines()[0])
    ap.add_argument('data', type=Path, help='dataset folder (any layout `reclmis data check` reads)')
    ap.add_argument('--preset', default='small')
    ap.add_argument('--seeds', type=int, nargs='+', default=[3407, 1, 2])
    ap.add_argument('--threads', type=int, default=2, help='torch CPU threads (results depend on it)')
    ap.add_argument('--target', type=float, default=0.75, help='validation Dice to reach')
    ap.add_argument('--set', nargs='*', default=[], metavar='FIELD=VALUE', help='recipe fields to change')
    ap.add_argument('--out', type=Path, help='folder of the runs (one sub-folder per seed)')
    ap.add_argument('--json', action='store_true', help='print one JSON object instead of the table')
    a = ap.parse_args(argv)
    try:
        from reclmis_nb.recipes import get_recipe
        sets = parse_sets(a.set)
        if 'seed' in sets: raise ValueError('--set seed=...: give the seeds with --seeds')
        get_recipe(a.preset, **sets)  # refuses an unknown preset or field now
        if not a.data.is_dir(): raise ValueError(f'{a.data}: no such dataset folder')
        if a.threads < 1: raise ValueError(f'--threads {a.threads}: at least 1')
    except (ValueError, TypeError) as e:
        print(f'time_to_accuracy.py: {e}', file=sys.stderr); return 2
    import torch
    torch.set_num_threads(a.threads)
    out = a.out or Path('runs')/f'tta-{a.preset}-{time.strftime("%Y%m%d-%H%M%S")}'
    load = [os.getloadavg()[0]]
    res = {}
    for s in a.seeds:
        with contextlib.redirect_stdout(sys.stderr if a.json else sys.stdout):  # --json: stdout holds the object alone
            run = run_seed(a.data, a.preset, s, out/f'seed-{s}', sets)
        with open(run/'history.csv') as f: res[s] = summarise(list(csv.DictReader(f)), a.target)
    load.append(os.getloadavg()[0])
    summary = dict(preset=a.preset, set=sets, threads=a.threads, target=a.target, runs=str(out), load_average=load,
                   seeds={str(s): r for s, r in res.items()},
                   all_reached=all(r['seconds_to_target'] is not None for r in res.values()),
                   slowest_seconds_to_target=max((r['seconds_to_target'] or float('inf')) for r in res.values()),
                   worst_drop=max(r['worst_drop'] for r in res.values()))
    if a.json: print(json.dumps(summary)); return 0
    print(f'preset {a.preset} {sets or ""} on {a.threads} threads, target valid Dice {a.target}; runs in {out}')
    print(f'load average {load[0]:.2f} before, {load[1]:.2f} after')
    print(f'{"seed":>6}  {"seconds to target (epoch)":>26}  {"worst drop":>10}  {"best":>6}  {"final":>6}  valid Dice per epoch')
    for s, r in res.items():
        when = '-' if r['epoch_reached'] is None else f'{r["seconds_to_target"]:.0f} s ({r["epoch_reached"]})'
        print(f'{s:>6}  {when:>26}  {r["worst_drop"]:>10.4f}  {r["best"]:>6.4f}  {r["final"]:>6.4f}  '
              + ' '.join(f'{d:.4f}' for d in r['dice']))
    print(f'seconds per epoch: ' + '; '.join(f'{s}: ' + ' '.join(f'{x:.0f}' for x in r['seconds']) for s, r in res.items()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
