"""EleutherAI's lm-evaluation-harness on lmkiln runs, without exporting them.

`LmkilnLM` is an lm-eval model (a `TemplateLM`): lm-eval splits each request into context and
continuation tokens with the run's own tokenizer, and this class scores them in padded batches
with the run's Transformer (LoRA adapters merged by `load_run`), exactly as lm-eval's `hf` model
scores the exported directory: same windows, same truncation, same greedy check. Generation is
greedy (or sampled, if a task asks for a temperature) with the KV cache, stopping at EOS or at
the task's stop strings.

    run_harness("runs/x", ["hellaswag"])                      # a registry task (needs its dataset)
    run_harness("runs/x", ["my_task"], include="tasks/")      # a local task YAML with local data
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from torch import nn

from lmkiln.data.tokenizer import Tokenizer
from lmkiln.errors import LmkilnError
from lmkiln.model.generate import Sampling, generate_ids
from lmkiln.model.transformer import Transformer
from lmkiln.runs.load import load_run

log = logging.getLogger("lmkiln")


class LmkilnLM(TemplateLM):
    """An lm-eval model for an lmkiln run directory (or an already loaded model and tokenizer)."""

    def __init__(
        self,
        run_dir: str | None = None,
        *,
        model: Transformer | None = None,
        tokenizer: Tokenizer | None = None,
        batch_size: int | str = 16,
        device: str = "cpu",
        max_gen_toks: int = 256,
    ) -> None:
        super().__init__()
        if model is None:
            if run_dir is None:
                raise LmkilnError("LmkilnLM needs run_dir (or model= and tokenizer=)")
            loaded = load_run(run_dir, device=device)
            model, tokenizer = loaded.model, loaded.tokenizer
        if tokenizer is None:
            raise LmkilnError("LmkilnLM(model=...) needs its tokenizer too")
        self.model, self.lmkiln_tokenizer = model.eval(), tokenizer
        # lm-eval passes strings from --model_args; "auto" (its batch-size search) is not offered
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        self.max_gen_toks = int(max_gen_toks)
        self._device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id

    # -- what lm-eval asks of a model -----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.lmkiln_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and each rolling window) starts from: BOS if the tokenizer has
        one, else EOS — lm-eval's `hf` rule, so scores match the exported directory's."""
        bos = self.lmkiln_tokenizer.bos_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.lmkiln_tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.lmkiln_tokenizer.decode(tokens)

    # -- scoring ----------------------------------------------------------------------------------
    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]], **kwargs
    ) -> list[tuple[float, bool]]:
        """(summed log-prob of the continuation, whether greedy decoding gives it) per request.

        As lm-eval's `hf` model: the model sees the last max_length tokens of context + continuation
        minus the final token; longest requests first so each padded batch wastes little.
        """
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            scored = self._score([requests[i][1:] for i in rows])
            for row, result in zip(rows, scored):
                results[row] = result
                if requests[row][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[row][0], result)
        return results

    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        inputs = [(context + continuation)[-(self.max_length + 1) :][:-1] for context, continuation in pairs]
        width = max(len(ids) for ids in inputs)
        batch = torch.full((len(inputs), width), self.pad_id, dtype=torch.long)
        for row, ids in enumerate(inputs):  # right padding: causal attention never reaches it
            batch[row, : len(ids)] = torch.tensor(ids)
        logps = F.log_softmax(self.model(batch.to(self._device)).float(), dim=-1)  # (B, T, V)
        found = []
        for row, ((_, continuation), ids) in enumerate(zip(pairs, inputs)):
            span = logps[row, len(ids) - len(continuation) : len(ids)]  # (n, V)
            target = torch.tensor(continuation, device=span.device)
            greedy = bool((span.argmax(dim=-1) == target).all())
            found.append((float(span.gather(-1, target[:, None]).sum()), greedy))
        return found

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of max_length, as lm-eval's `hf` model."""
        totals = []
        for (text,) in [request.args for request in requests]:
            windows = map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            scored = self._loglikelihood_tokens([(None, context, target) for context, target in windows])
            total = sum(logp for logp, _ in scored)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            totals.append(total)
        return totals

    # -- generation -------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations cut at the first stop string; requests with equal settings run batched."""
        args = [request.args for request in requests]
        outputs: list[str] = [""] * len(args)
        groups: dict[str, list[int]] = {}
        for index, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(repr(sorted(gen_kwargs.items())), []).append(index)
        for indices in groups.values():
            gen_kwargs = args[indices[0]][1]
            for start in range(0, len(indices), self.batch_size):
                rows = indices[start : start + self.batch_size]
                texts = self._generate([args[i][0] for i in rows], gen_kwargs)
                for row, text in zip(rows, texts):
                    outputs[row] = text
                    self.cache_hook.add_partial("generate_until", args[row], text)
        return outputs

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        gen_kwargs = dict(gen_kwargs)
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(gen_kwargs.pop("temperature", 0.0)) if gen_kwargs.pop("do_sample", False) else 0.0
        budget = self.max_length - max_new
        if budget <= 0:
            raise LmkilnError(
                f"max_gen_toks={max_new} leaves no room for a prompt in the context of {self.max_length}"
            )
        prompts = [self.tok_encode(context)[-budget:] or [self.prefix_token_id] for context in contexts]
        sampling = Sampling(max_new_tokens=max_new, temperature=temperature, seed=1234)
        generated: list[list[int]] = [[] for _ in prompts]

        def on_tokens(tokens: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
            """Stop a row once its text contains a stop string (checked on the decoded text)."""
            stop = torch.zeros_like(active)
            for row in active.nonzero().flatten().tolist():
                generated[row].append(int(tokens[row]))
                stop[row] = any(s in self.tok_decode(generated[row]) for s in until)
            return stop

        new = generate_ids(self.model, prompts, sampling, self.eot_token_id, self.pad_id, on_tokens=on_tokens)
        texts = []
        for ids in new:
            text = self.tok_decode(ids)
            for stop in until:  # lm-eval returns the text before the first stop string
                text = text.split(stop)[0] if stop else text
            texts.append(text)
        return texts


def _knows(manager, task: str) -> bool:
    return task in manager.all_subtasks or task in manager.all_groups or task in manager.all_tags


def task_manager(tasks: Sequence[str], include: str | Path | None = None):
    """lm-eval's TaskManager for `tasks`. Indexing lm-eval's registry of ~15,000 task YAMLs takes
    seconds, so local tasks are looked up in `include` alone first; an unknown name is an
    LmkilnError that suggests close matches."""
    from lm_eval.tasks import TaskManager

    if include:
        local = TaskManager(include_path=str(include), include_defaults=False)
        if all(_knows(local, task) for task in tasks):
            return local
    manager = TaskManager(include_path=str(include) if include else None)
    for task in tasks:
        if not _knows(manager, task):
            matches = difflib.get_close_matches(task, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(matches)}?)" if matches else ""
            where = f" or in {include}" if include else "; a local task YAML needs --include DIR"
            raise LmkilnError(f"unknown harness task {task!r}: not in lm-eval's registry{where}{hint}")
    return manager


def run_harness(
    run_dir: str | Path,
    tasks: Sequence[str],
    include: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    num_fewshot: int | None = None,
    model: nn.Module | None = None,
    tokenizer: Tokenizer | None = None,
) -> dict:
    """lm-eval's `simple_evaluate` on a run; returns its results dictionary.

    include: a directory (or file) of task YAMLs next to lm-eval's registry. An unknown task name
    is an LmkilnError listing close matches.
    """
    from lm_eval import simple_evaluate

    manager = task_manager(tasks, include)
    lm = LmkilnLM(
        None if model is not None else str(run_dir),
        model=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        device=device,
    )
    try:
        return simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            log_samples=False,
            bootstrap_iters=0,
        )
    except FileNotFoundError as err:  # a local task's data_files resolve from the working directory
        raise LmkilnError(
            f"harness task data not found: {err} (data_files in a task YAML are relative to the working "
            f"directory; give an absolute path)"
        ) from None
