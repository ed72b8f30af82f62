"""The papermill runner behind ``seggpt reproduce``: executes the notebooks in order, renders them, writes the summary.

jupytext, nbformat, papermill, nbconvert, jupyter_client and zmq are imported inside the functions
that use them: they are heavy (papermill and nbconvert take seconds) and only running or rendering a
notebook needs them, not importing this module (the summary, the CLI's ``--print-config``)."""
from __future__ import annotations

import copy
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from seggpt_lib.experiments.config import (
    BEYOND_NOTEBOOK,
    NOTEBOOK_DIR,
    NOTEBOOK_PARAMETERS,
    NOTEBOOKS,
    REPO_ROOT,
    PipelineError,
    parse_data_spec,
    resolve_weights,
)
from seggpt_lib.experiments.report import build_summary, fold_code, headline_table, results_first, write_index_html
from seggpt_lib.experiments.results import result_dirs, write_table


# ------------------------------------------------------------------------------------------
# running notebooks
# ------------------------------------------------------------------------------------------
def notebook_source(name: str, notebooks_dir: str | os.PathLike | None = None):
    """A notebook as an nbformat node, read from its percent-format ``.py`` (the source of
    truth; the paired ``.ipynb`` when there is no ``.py``)."""
    import jupytext  # lazy: see the module docstring

    d = Path(notebooks_dir or NOTEBOOK_DIR)
    py, ipynb = d / f"{name}.py", d / f"{name}.ipynb"
    if py.is_file():
        nb = jupytext.read(py)
    elif ipynb.is_file():
        nb = jupytext.read(ipynb)
    else:
        raise PipelineError(f"notebook {name} not found in {d} (.py or .ipynb)")
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata.pop("jupytext", None)
    return nb


def notebook_parameters(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """The papermill parameters of notebook ``name`` from a pipeline config."""
    keys = NOTEBOOK_PARAMETERS[name]
    params: dict[str, Any] = {}
    for k in keys:
        if k in ("source", "source_path"):
            continue
        params[k] = copy.deepcopy(config[k])
    if "source" in keys:
        params["source"], params["source_path"] = parse_data_spec(config["data"])
    if "weights" in params and params["weights"]:
        params["weights"] = str(Path(resolve_weights(params["weights"])).expanduser().resolve())
    if "preset" in params and params.get("weights") and "preset" not in config.get("_explicit", []):
        params["preset"] = "auto"  # weights given, no preset asked for: the checkpoint's architecture
    params["results_dir"] = str(Path(config["results_dir"]).expanduser().resolve())
    return params


def _kernel_env() -> None:
    os.environ.setdefault("JUPYTER_PREFER_ENV_PATH", "1")  # this environment's python3 kernel first
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    os.environ.setdefault("MPLBACKEND", "agg")
    pp = os.environ.get("PYTHONPATH", "")
    if str(REPO_ROOT) not in pp.split(os.pathsep):
        os.environ["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + pp if pp else "")


def _kernel_manager_class():
    """A kernel manager that provisions CurveZMQ keys where jupyter_client, pyzmq and the
    kernelspec support it (encrypted kernel traffic, and no "running over TCP without
    encryption" warning on every stage); None keeps nbclient's default."""
    try:  # lazy: see the module docstring
        import zmq
        from jupyter_client.manager import AsyncKernelManager
    except ImportError:  # pragma: no cover
        return None
    if "transport_encryption" not in AsyncKernelManager.class_trait_names() or not zmq.has("curve"):
        return None

    class _CurveKernelManager(AsyncKernelManager):
        def __init__(self, **kw: Any) -> None:
            super().__init__(**kw)
            self.transport_encryption = "auto"  # only where the kernelspec declares support

    return _CurveKernelManager


class _PrefixWriter:
    """A text stream that prefixes every line (the notebooks' printed progress, indented)."""

    def __init__(self, stream, prefix: str = "    | ") -> None:
        self.stream, self.prefix, self._bol = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for ch in text.splitlines(keepends=True):
            if self._bol:
                out.append(self.prefix)
            out.append(ch)
            self._bol = ch.endswith("\n")
        self.stream.write("".join(out))
        self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def execute_notebook(name: str, output: str | os.PathLike, parameters: dict[str, Any], kernel: str = "python3",
                     notebooks_dir: str | os.PathLike | None = None, cwd: str | os.PathLike | None = None,
                     timeout: int | None = None, echo=None) -> Path:
    """Run notebook ``name`` with papermill, writing the executed copy to ``output``; what the
    notebook prints goes to ``echo`` (a text stream) too, line by line as it comes. A failing
    cell raises :class:`PipelineError` naming the notebook, the error and the partial copy."""
    import nbformat  # lazy: see the module docstring
    import papermill as pm
    from jupyter_client.kernelspec import NoSuchKernel

    _kernel_env()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    src = output.with_name(output.stem + ".input.ipynb")
    nb = notebook_source(name, notebooks_dir)
    nb.metadata["kernelspec"]["name"] = kernel
    nbformat.write(nb, src)
    try:
        declared = pm.inspect_notebook(str(src))
        unknown = sorted(set(parameters) - set(declared))
        if unknown:
            raise PipelineError(f"notebook {name} has no parameter(s) {unknown} (its parameters: {sorted(declared)})")
        extra: dict[str, Any] = {}
        if echo is not None:
            extra["stdout_file"] = _PrefixWriter(echo)
        km = _kernel_manager_class()
        if km is not None:
            extra["kernel_manager_class"] = km
        pm.execute_notebook(str(src), str(output), parameters=parameters, kernel_name=kernel, progress_bar=False,
                            cwd=str(cwd or os.getcwd()), execution_timeout=timeout, log_output=False, **extra)
    except NoSuchKernel:
        raise PipelineError(f"no Jupyter kernel named {kernel!r}: install it with "
                            f"`{sys.executable} -m ipykernel install --sys-prefix --name {kernel}` (make install does)") from None
    except pm.PapermillExecutionError as e:
        raise PipelineError(
            f"notebook {name} failed in cell {e.cell_index} (execution count {e.exec_count}): {e.ename}: {e.evalue}\n"
            f"  partially executed copy: {output}"
        ) from None
    finally:
        try:
            src.unlink()
        except OSError:
            pass
    return output


def render_html(executed: str | os.PathLike, out_html: str | os.PathLike, index_href: str | None = "../index.html") -> Path:
    """An executed notebook as a standalone HTML page (images embedded) that reads as a report: it
    opens with the notebook's results (:func:`~seggpt_lib.experiments.report.results_first`) and its
    code cells are folded, with a "show code" switch and a link to ``index_href`` at the top
    (:func:`~seggpt_lib.experiments.report.fold_code`)."""
    import nbformat  # lazy: see the module docstring
    from nbconvert import HTMLExporter

    nb = results_first(nbformat.read(str(executed), as_version=4))
    exporter = HTMLExporter()
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": Path(executed).stem}})
    body = fold_code(body, index_href)
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(body, encoding="utf-8")
    return out


def _fmt_dur(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class _Heartbeat:
    """Prints ``still running`` lines (with the training's last logged step) while a stage runs."""

    def __init__(self, label: str, interval: float, t_start: float, probe: Callable[[], str] | None,
                 log: Callable[[str], None]) -> None:
        self.label, self.interval, self.t_start, self.probe, self.log = label, interval, t_start, probe, log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.wait(self.interval):
            extra = ""
            if self.probe is not None:
                try:
                    extra = self.probe()
                except Exception:  # a half-written file: skip this beat
                    extra = ""
            self.log(f"{self.label}: running for {_fmt_dur(time.perf_counter() - t0)} "
                     f"(total {_fmt_dur(time.perf_counter() - self.t_start)}){'; ' + extra if extra else ''}")

    def __enter__(self):
        if self.interval and self.interval > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


def training_run_dir(results_dir: str | os.PathLike) -> Path:
    return Path(results_dir) / "work" / "train" / "run"


def _training_probe(results_dir: Path, beyond: bool = False) -> Callable[[], str]:
    def probe() -> str:
        if beyond:  # notebook 05 trains in work/beyond/run_<negative_target>
            found = sorted((Path(results_dir) / "work" / "beyond").glob("run_*/metrics.csv"),
                           key=lambda q: q.stat().st_mtime)
            p = found[-1] if found else Path(results_dir) / "missing"
        else:
            p = training_run_dir(results_dir) / "metrics.csv"
        if not p.is_file():
            return ""
        lines = p.read_text().strip().splitlines()
        if len(lines) < 2:
            return ""
        head = lines[0].split(",")
        last = dict(zip(head, lines[-1].split(",")))
        msg = f"step {last.get('step')}, loss {float(last.get('loss', 'nan')):.4f}"
        vals = [dict(zip(head, ln.split(","))).get("val_miou", "") for ln in lines[1:]]
        vals = [v for v in vals if v not in ("", "nan")]
        if vals:
            msg += f", val mIoU {float(vals[-1]):.3f}"
        return msg

    return probe


def _clean_outputs(dirs: dict[str, Path]) -> None:
    for sub in ("tables", "figures", "reports"):
        for p in dirs[sub].iterdir():
            if p.is_file():
                p.unlink()
    for p in (dirs["root"] / "summary.json", dirs["root"] / "index.html"):
        if p.exists():
            p.unlink()
    for p in dirs["work"].glob("*.json"):
        p.unlink()
    for p in dirs["work"].glob("*.ipynb"):
        p.unlink()


def reproduce(config: dict[str, Any], stages: Sequence[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the notebooks (all of :data:`NOTEBOOKS`, or ``stages``) with one set of parameters, render the
    reports, merge the summary, write ``summary.json`` and ``index.html``. Returns the summary.
    A failing stage raises :class:`PipelineError` (after writing a partial summary and index)."""
    stages = list(stages or NOTEBOOKS)
    for s in stages:
        if s not in NOTEBOOK_PARAMETERS:
            raise PipelineError(f"unknown stage {s!r}; stages: {', '.join(NOTEBOOK_PARAMETERS)}")
    results = Path(config["results_dir"]).expanduser().resolve()
    if any((results / marker).exists() for marker in (".git", "pyproject.toml", "setup.py")):
        raise PipelineError(f"results_dir {results} looks like a source tree; pick a folder of its own (e.g. results)")
    dirs = result_dirs(results)
    if stages == list(NOTEBOOKS):
        _clean_outputs(dirs)
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    n = len(stages)
    log(f"seggpt reproduce: {n} stage(s) -> {results}")
    log(f"  data {config['data']}, preset {config['preset']}, weights {config['weights'] or '(none)'}, "
        f"steps {config['steps']}, train_minutes {config['train_minutes']}, device {config['device']}")
    failure: PipelineError | None = None
    for i, name in enumerate(stages, 1):
        label = f"[{i}/{n}] {name}"
        params = notebook_parameters(name, config)
        out = dirs["work"] / f"{name}.ipynb"
        log(f"{label}: started (total {_fmt_dur(time.perf_counter() - t_start)})")
        t0 = time.perf_counter()
        probe = (_training_probe(results) if name == "02_training" else
                 _training_probe(results, beyond=True) if name == BEYOND_NOTEBOOK else None)
        try:
            with _Heartbeat(label, float(config.get("heartbeat_s") or 0), t_start, probe, log):
                execute_notebook(name, out, params, kernel=config.get("kernel", "python3"),
                                 echo=sys.stdout if config.get("echo", True) else None)
        except PipelineError as e:
            times[name] = time.perf_counter() - t0
            failure = PipelineError(f"stage {i}/{n} failed: {e}")
            if out.is_file() and config.get("html", True):
                try:
                    render_html(out, dirs["reports"] / f"{name}.html")
                    failure = PipelineError(f"{failure}\n  its report so far: {dirs['reports'] / (name + '.html')}")
                except Exception:  # the partial copy may be unreadable: the message above still holds
                    pass
            log(f"{label}: FAILED after {_fmt_dur(times[name])}")
            break
        times[name] = time.perf_counter() - t0
        if config.get("html", True):
            render_html(out, dirs["reports"] / f"{name}.html")
        log(f"{label}: done in {_fmt_dur(times[name])} (total {_fmt_dur(time.perf_counter() - t_start)})")
    wall = time.perf_counter() - t_start
    summary = build_summary(results, config, times, wall, status="complete" if failure is None else "failed")
    (results / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if failure is None:
        write_table(headline_table(summary), results, "headline", title="Headline figures",
                    note="original: the published figures of the project this one grows from (11 VISION queries); "
                         "baselines on the same pairs.")
    write_index_html(results, summary)
    if failure is not None:
        raise failure
    log(f"done in {_fmt_dur(wall)}: {results / 'index.html'}")
    h = summary["headline"]
    show = ", ".join(f"{k} {v:.3f}" for k, v in h.items() if isinstance(v, (int, float)))
    if show:
        log(f"headline: {show}")
    return summary
