"""A run's settings (PruneConfig) and the one way from settings to model, task and evaluator.

Below the command layer: runs/, cli, evaluation and benchmarks/ all build through here, so a
setting means the same thing everywhere. Heavy imports wait until something is built.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path


def default_order(metric: str) -> str:
    """The removal order of a prune that names none (algorithms.orders.default_order)."""
    from .algorithms.orders import default_order as default

    return default(metric)


MASKS = "masks"  # the order value (and --search masks) of learned-mask search (algorithms/masks.py)
MASK_KEYS = ("mask_steps", "mask_lr", "mask_margin")


def check_order_for_metric(order: str, metric: str) -> None:
    """ValueError naming the fix when `order` needs gradients that `metric` does not have."""
    from .metrics import METRICS, get_metric

    if order == MASKS and not get_metric(metric).gradient:
        with_gradient = ", ".join(m for m in METRICS if get_metric(m).gradient)
        raise ValueError(f"learned masks (--search masks) optimise through gradients, and the {metric} metric has "
                         f"none: use a metric with a gradient ({with_gradient}), or iterative pruning")
    if order == "attribution" and not get_metric(metric).gradient:
        with_gradient = ", ".join(m for m in METRICS if get_metric(m).gradient)
        raise ValueError(f"--order attribution ranks candidates by attribution gradients, and the {metric} metric "
                         f"has none: leave --order out (the default for {metric} is "
                         f"{default_order(metric)}) or choose another order, or use a metric with a gradient "
                         f"({with_gradient})")


@dataclass
class PruneConfig:
    """Everything that determines a prune run's result."""

    model: str = "smollm2-135m"
    task: str = "digits"
    level: str = "both"
    ablation: str = "mean"
    metric: str = "logit_diff"
    absolute: float | None = 0.8
    relative: float | None = None
    on: str = "faithfulness"
    order: str | None = None     # None: not chosen; resolve_order picks the saved or the default order
    max_passes: int = 10
    n_prompts: int = 24
    seed: int = 0
    template: int | str = 0      # a template number, or "all" (every template, one group each)
    corruption: str = "random"
    qkv: bool = True
    split_embed: bool = False    # the graph's embedding as two senders, tok and pos (learned positions only)
    attribution: str = "eap-ig"  # the ranking of --order attribution and of target searches
    steps: int = 5               # its EAP-IG integration steps
    device: str = "cpu"          # where the engine runs (the bridge stays where it loaded)
    dtype: str = "float32"       # the engine's dtype: float32, float64, bfloat16, float16
    threads: int | None = None   # torch threads; None: engine.choose_threads' rule (not a result setting)
    positions: str = "last"      # where the metric is read: last, all, or position names (readout.py)
    reduce: str | None = None    # over positions: mean or sum (None: sum for logprob, else mean)
    engine: str = "auto"         # fast, hooked, or auto (fast when it reproduces the model); not a result
                                 # setting: both paths compute the same scores (the path used is in stats)
    keep_all: bool = False       # built-in tasks: keep the prompts the model answers wrongly too
    mask_steps: int | None = None    # learned masks (order masks): Adam steps per phase (None: MaskSettings')
    mask_lr: float | None = None     # its learning rate
    mask_margin: float | None = None  # aim at absolute + margin
    sae: tuple = ()              # dictionaries spliced in (--sae): sae_lens directories or FILE.safetensors@HOOK
    given: frozenset = frozenset()  # settings the user gave explicitly (command line flags, sweep keys): one that
                                    # cannot apply is refused even at its default value; not a result setting

    def __post_init__(self):
        if isinstance(self.sae, (list, str)):  # a sweep's list (or one path) as the tuple it is everywhere else
            self.sae = (self.sae,) if isinstance(self.sae, str) else tuple(self.sae)
        if self.sae and self.level == "both" and "level" not in self.given:
            self.level = "nodes"  # a feature graph's default level (its features have no edges yet)

    def to_json(self) -> dict:
        """The settings that determine the result: an order not chosen as default_order resolves it; threads
        never; device, dtype, split_embed, positions and reduce when not the defaults (so run directories
        written before they existed keep their settings)."""
        d = dict(self.__dict__)
        d["order"] = self.order if self.order is not None else default_order(self.metric)
        d.pop("threads")
        d.pop("engine")
        d.pop("given")
        for k in MASK_KEYS:
            d.pop(k)
        if d["order"] == MASKS:  # the settings the search used, defaults resolved
            d.update({f"mask_{k}": v for k, v in self.mask_settings().to_json().items()
                      if k in ("steps", "lr", "margin")})
        for k, default in (("device", "cpu"), ("dtype", "float32"), ("split_embed", False), ("positions", "last"),
                           ("reduce", None), ("keep_all", False)):
            if d[k] == default:
                d.pop(k)
        if self.sae:  # each dictionary by its digest too: a changed dictionary is a changed setting
            from .features.saelens import load_spec
            d["sae"] = [{"path": s, "digest": load_spec(s).digest()} for s in self.sae]
        else:
            d.pop("sae")
        return d

    def dictionaries(self) -> list:
        """The dictionaries --sae names, loaded (features.saelens.load_spec)."""
        from .features.saelens import load_spec
        return [load_spec(s) for s in self.sae]

    def mask_settings(self):
        """The MaskSettings of a learned-mask run (defaults where not given)."""
        from .algorithms.mask_settings import MaskSettings

        return MaskSettings.of(self.mask_steps, self.mask_lr, self.mask_margin)

    def _check_mask_settings(self) -> None:
        """Mask settings only with order masks; masks need the absolute threshold on faithfulness."""
        given = [k for k in MASK_KEYS if getattr(self, k) is not None]
        if self.order != MASKS:
            if given:
                flag = "--" + given[0].replace("_", "-")
                raise ValueError(f"{flag} does not apply: it sets learned-mask search; add --search masks "
                                 f"(order masks) or leave {flag} out")
            return
        self.mask_settings()
        if self.absolute is None or self.on != "faithfulness":
            raise ValueError("learned masks aim at the absolute threshold on faithfulness: give --absolute (e.g. 0.8) "
                             "with thresholds on faithfulness")
        if self.engine == "hooked":
            from .algorithms.mask_settings import MASKS_REFUSED
            raise ValueError(f"--engine hooked: {MASKS_REFUSED}")

    def check(self) -> "PruneConfig":
        """Reject settings that cannot run before anything is loaded; each message names the fix."""
        from .algorithms.orders import parse_order
        from .algorithms.search import Thresholds, phases
        from .catalogue import find_model
        from .engine import DTYPES, parse_device
        from .hooked import ENGINES
        from .metrics import get_metric
        from .models import LOCAL, check_local
        from .patching import ABLATIONS

        if find_model(self.model) is LOCAL:
            check_local(self.model)
        for flag, value in (("n-prompts", self.n_prompts), ("max-passes", self.max_passes), ("steps", self.steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{flag} {value!r} must be a whole number of at least 1")
        if self.template != "all" and (isinstance(self.template, bool) or not isinstance(self.template, int)
                                       or self.template < 0):
            raise ValueError(f"--template {self.template!r} must be a template number (0, 1, ...) or all")
        from .readout import REDUCTIONS, parse_positions
        positions = parse_positions(self.positions)
        if self.reduce is not None and self.reduce not in REDUCTIONS:
            raise ValueError(f"--reduce {self.reduce!r}: choose one of {', '.join(REDUCTIONS)}")
        if self.metric == "logprob" and positions != "last":
            raise ValueError("the logprob metric reads the answer's own tokens; it takes --positions last only")
        phases(self.level)
        if self.ablation not in ABLATIONS:
            raise ValueError(f"unknown ablation {self.ablation!r}; choose one of {', '.join(ABLATIONS)}")
        get_metric(self.metric)
        if self.attribution not in ("eap", "eap-ig"):
            raise ValueError(f"unknown attribution method {self.attribution!r}; choose eap or eap-ig")
        Thresholds(self.absolute, self.relative, self.on)
        if self.order is not None:
            if self.order != MASKS:
                parse_order(self.order, self.attribution, self.steps)
            check_order_for_metric(self.order, self.metric)
        self._check_mask_settings()
        unused = [k for k in ("attribution", "steps") if k in self.given]
        if unused and not get_metric(self.metric).gradient:
            flag = "--" + unused[0]
            raise ValueError(f"{flag} does not apply: nothing ranks by attribution with the {self.metric} metric, "
                             f"which has no gradient (no attribution order, no EAP-IG curve); leave {flag} out")
        check_task_name(self.task)
        self._check_task_settings()
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        parse_device(self.device)
        if not isinstance(self.split_embed, bool):
            raise ValueError(f"split_embed {self.split_embed!r} must be true or false")
        if self.engine not in ENGINES:
            raise ValueError(f"--engine {self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.sae:
            self._check_sae()
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"--threads {self.threads!r} must be a whole number of at least 1")
        return self

    def _check_sae(self) -> None:
        """Dictionaries that load, a node-level search (feature nodes have no edges yet), the fast engine."""
        from .algorithms.levels import phases
        if not isinstance(self.sae, (tuple, list)) or not all(isinstance(s, str) for s in self.sae):
            raise ValueError(f"sae {self.sae!r} must be a list of dictionary paths")
        if self.engine == "hooked":
            raise ValueError("--sae needs the fast engine (features are spliced into its forward pass); leave "
                             "--engine hooked out")
        from .graphs.model_graph import edgeless_hooks, edgeless_message
        flat = edgeless_hooks(d.writes for d in self.dictionaries())
        if flat and any(p in ("edges", "edge-positions") for p in phases(self.level)):
            raise ValueError(edgeless_message(flat, self.level))

    def _check_task_settings(self) -> None:
        """Refuse a task setting this kind of task does not use (given, or not at its default): a task file
        holds its own prompts, a toy task has one template and its own corruption."""
        kind = task_kind(self.task)
        if kind == "builtin":
            return
        used = ("n_prompts", "seed") if kind == "toy" else ()
        for key, default in TASK_SETTING_DEFAULTS.items():
            if key in used or (key not in self.given and getattr(self, key) == default):
                continue
            flag = "--" + key.replace("_", "-")
            if kind == "file":
                why = (f"the task file {self.task!r} holds its own prompts and corrupted prompts, and every one of "
                       "them is used" + (" (to use fewer, shorten the file)" if key == "n_prompts" else ""))
            else:
                why = (f"the toy task {self.task!r} has one template and makes its corrupted prompts its own way"
                       if key in ("template", "corruption") else
                       f"the toy task {self.task!r} keeps every prompt it makes (its model answers them by design)")
            raise ValueError(f"{flag} does not apply: {why}; leave {flag} out")

    def resolve_order(self, saved: dict | None = None) -> tuple["PruneConfig", str | None]:
        """This config with its order chosen, and a note saying why when that is not plain: an order given
        stays; else the order of `saved` (the settings of the run directory being resumed: a run keeps the
        order it started with, also one started under an earlier default); else default_order(metric)."""
        if self.order is not None:
            return self, None
        default = default_order(self.metric)
        old = (saved or {}).get("order")
        if isinstance(old, str) and old != default and _valid_order(old, self.metric):
            return replace(self, order=old), (f"order {old}: the order this run directory was started with "
                                              f"(--order not given; a new run's default is {default}); to run "
                                              f"another order, give --order and another --out")
        note = None
        if default != "attribution":
            note = (f"order {default}: the default order, attribution, ranks by gradients and the {self.metric} "
                    "metric has none (--order chooses another)")
        return replace(self, order=default), note


def _valid_order(order: str, metric: str) -> bool:
    """Whether a saved order can run again here (a file: order's file may be gone)."""
    from .algorithms.orders import parse_order

    try:
        if order != MASKS:
            parse_order(order)
        check_order_for_metric(order, metric)
    except ValueError:
        return False
    return True


TASK_SETTING_DEFAULTS = {"n_prompts": 24, "seed": 0, "template": 0, "corruption": "random", "keep_all": False}


def task_kind(name: str) -> str:
    """'file' (a .jsonl task file or a run's task.json), 'toy' (a toy model's task) or 'builtin'."""
    from . import toys

    if name.endswith((".jsonl", ".json")):
        return "file"
    return "toy" if name in toys.TASKS else "builtin"


def check_task_name(name: str) -> None:
    """A task name is a toy task, a built-in, or a readable JSONL file (read and checked here)."""
    from . import toys
    from .tasks import TASKS, TaskError
    from .tasks.base import read_task_file

    if name.endswith(".jsonl"):
        read_task_file(name)
    elif name.endswith(".json"):
        read_task_json(name)
    elif name not in toys.TASKS and name not in TASKS:
        raise TaskError(f"unknown task {name!r}; built-in tasks: {', '.join([*TASKS, *toys.TASKS])} "
                        "(or a .jsonl file, or a run's task.json)")


def read_task_json(path: str | Path):
    """A task saved as token ids (a run's task.json); TaskError naming the file when it is not one."""
    from .tasks.base import Task, TaskError

    try:
        return Task.from_json(json.loads(Path(path).read_text()))
    except OSError as e:
        raise TaskError(f"task file {str(path)!r} cannot be read: {e.strerror}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, TaskError):
            raise TaskError(f"{path}: {e}") from None
        raise TaskError(f"{path} is not a task.json of token ids ({e})") from None


def resolve_task(config: PruneConfig, model, task_file: str | Path | None = None):
    """The task of a run: a saved task.json if given, else a toy task, a JSONL file or a built-in."""
    from . import toys
    from .tasks.base import Task, TaskError

    if task_file is not None:
        return Task.from_json(json.loads(Path(task_file).read_text()))
    name = config.task
    if name.endswith(".json"):
        return read_task_json(name)
    if name.endswith(".jsonl"):
        from .tasks.base import load_task
        return load_task(name, model.tokenizer)
    if name in toys.TASKS:
        return toys.TASKS[name][0](n=config.n_prompts, seed=config.seed)
    if model.tokenizer is None:
        why = model.meta.get("no_tokenizer")
        raise TaskError(f"task {name!r} is made of text, but model {model.name!r} has no tokenizer"
                        + (f" (its tokenizer did not load: {why})" if why else "")
                        + f": use token-id tasks (a JSONL file of ids, a run's task.json; with test models "
                          f"--task {' or '.join(toys.TASKS)})")
    from .tasks import get_task
    return get_task(name, model.tokenizer, n=config.n_prompts, seed=config.seed, template=config.template,
                    corruption=config.corruption, model=model, filter=not config.keep_all)


def evaluator(config: PruneConfig, model, task, log=None):
    """The evaluator of `task` on `model` with the config's ablation, metric, graph (qkv, split_embed) and
    readout: the fast engine's, or the hook-based path's (config.engine; auto says why on `log`, see
    hooked.make_evaluator)."""
    from .algorithms.levels import phases
    from .hooked import POSITIONS_REFUSED, make_evaluator

    ev = make_evaluator(model, task, config.ablation, config.metric, qkv=config.qkv, engine=config.engine,
                        device=config.device, dtype=config.dtype, log=log, split_embed=config.split_embed,
                        positions=config.positions, reduce=config.reduce, dictionaries=config.dictionaries())
    if "positions" in phases(config.level) and getattr(ev, "path", "fast") == "hooked":
        raise ValueError(f"--level {config.level}: {POSITIONS_REFUSED}")  # before any search, not after its nodes
    return ev


def memory_needed(model, task) -> int:
    """Rough peak bytes of searching `task` on `model`: the evaluator keeps a few cached runs (4 residual-
    sized tensors per token and layer each), and attribution's autograd graph holds every head's own
    q/k/v input (3H residual-sized tensors per token and layer) plus MLP intermediates. float32."""
    tokens = len(task) * task.seq_len
    return 4 * tokens * model.n_layers * model.d_model * (28 + 3 * model.n_heads)


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr)


_SAID: set = set()  # notes this process has said once already


def check_fits(model, task, log=None, force: bool = False) -> None:
    """Refuse a task that will not fit in memory (unless forced), warn when it takes over half of it; where
    this system does not say how much memory is free, say once that nothing was checked."""
    need, have = memory_needed(model, task), available_memory()
    if have is None:
        if "memory" not in _SAID:
            _SAID.add("memory")
            (log or _stderr)("note: memory not checked: this system has no /proc/meminfo to say how much is free "
                             f"(the search needs about {need / 2 ** 30:.1f} GiB); watch its memory yourself")
        return
    gib = lambda b: f"{b / 2 ** 30:.1f} GiB"
    what = f"{len(task)} prompts x {task.seq_len} tokens on {model.name} ({model.n_layers} layers, d_model {model.d_model})"
    if need > have and not force:
        raise ValueError(f"{what} needs about {gib(need)} of memory and {gib(have)} is available: use fewer "
                         "prompts (--n-prompts, or a smaller task file), or pass --no-memory-check to try anyway")
    if need > have / 2 and log is not None:
        log(f"warning: {what} needs about {gib(need)} of memory; {gib(have)} is available")


def open_model(name: str, log=None):
    """load_model(name), saying what its load has to say (model.notes, e.g. a tokenizer that did not load)
    on `log` (default: standard error) once, at load."""
    from .catalogue import load_model

    model = load_model(name)
    for note in model.notes:
        (log or _stderr)(note)
    return model


def build(config: PruneConfig, model=None, task_file: str | Path | None = None, log=None, force: bool = False):
    """(model, task, evaluator) of a config; `model` saves the load when it is already loaded,
    `task_file` (a saved task.json) replaces building the task. A task that will not fit in memory
    is refused before the evaluator runs it (force: try anyway); log gets the warnings."""
    from .engine import choose_threads

    config.check()
    model = model if model is not None else open_model(config.model, log)
    choose_threads(model, config.threads)
    task = resolve_task(config, model, task_file)
    check_fits(model, task, log, force)
    ev = evaluator(config, model, task, log)  # checks the prompts' token ids first
    for site in ev.index.sites:  # a feature graph: how many of each dictionary's features became nodes
        if log is not None:
            where = site.hook if site.hook == site.writes else f"{site.hook} -> {site.writes}"
            log(f"dictionary at {where}: {len(site.active)} of its {site.n_features} features are active on the "
                f"task's prompts and become nodes (with its error node {site.prefix}{site.layer}.err)")
    if task_kind(config.task) == "file" and not {"n_kept", "n_correct"} & set(task.meta):
        from .tasks import note_answered
        note_answered(task, model)  # a task file is used whole: how many prompts the model answers is said
    return model, task, ev


