"""Generate text with a Titans model, mlx-lm style, with resumable sessions.

    python -m titans_mlx.generate --prompt "In the beginning"              # the bundled demo model
    python -m titans_mlx.generate --model DIR --prompt-file book.txt --max-tokens 0 --save-state book.safetensors
    python -m titans_mlx.generate --model DIR --load-state book.safetensors --prompt "And then"

Flags, defaults and output follow ``mlx_lm.generate``. A long prompt is fed in blocks of ``--prefill-step-size``
tokens aligned to the model's segments (the memory chunk), evaluating the cache and clearing MLX's buffer cache
between blocks, so memory stays flat however long the document is. ``--save-state`` writes the whole session (the
attention windows, the neural memories' weights and momentum, the logits of the next token, recent tokens and the
position) to one file, an mlx-lm prompt cache with titans_mlx's metadata (see titans_mlx.session); ``--load-state``
continues exactly where it stopped.

Library: ``stream_generate(model, tokenizer, prompt, **kw)`` yields mlx-lm ``GenerationResponse`` objects and
``generate(...)`` returns the text; ``GenerationState`` with ``save_state``/``load_state`` carries a session.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Generator, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn

from .session import HISTORY, GenerationError, GenerationState, load_state, save_state

DEFAULT_MODEL = Path(__file__).resolve().parent / "demo_model"
DEFAULT_PROMPT = "hello"
DEFAULT_MAX_TOKENS = 100
DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_MIN_P = 0.0
DEFAULT_TOP_K = 0
DEFAULT_PREFILL_STEP_SIZE = 2048

# ---- generation ------------------------------------------------------------------------------------------------------


def _block_size(model: nn.Module, prefill_step_size: int) -> int:
    # prefill blocks end on segment boundaries: every block then holds whole memory chunks (a chunk is one segment
    # plus its long-term tokens), except the last segment's long-term tokens, which open the next block
    seg = getattr(getattr(model, "args", None), "segment_len", None) or 1
    return max(seg, (prefill_step_size // seg) * seg)


def generate_step(
    prompt: Union[mx.array, Sequence[int]],
    model: nn.Module,
    *,
    max_tokens: int = 256,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable[[mx.array, mx.array], mx.array]]] = None,
    state: Optional[GenerationState] = None,
    prefill_step_size: int = DEFAULT_PREFILL_STEP_SIZE,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
) -> Generator[tuple, None, None]:
    """Yield (token, logprobs) pairs, like ``mlx_lm.generate.generate_step``.

    Every yielded token has been fed to the model already, so ``state`` is complete whenever the generator is
    paused or closed: saving it then and continuing later equals one uninterrupted run. ``max_tokens`` 0 only
    processes the prompt; -1 never stops.

    Ours rather than mlx-lm's for two differences: the session keeps the next token's raw logits (mlx-lm's keeps them
    inside the generator), so a saved session continues with an empty prompt, logits processors included; and prompt
    blocks end on segment boundaries, so each block stores whole memory chunks.
    """
    from mlx_lm.generate import generation_stream
    from mlx_lm.sample_utils import make_sampler

    state = state if state is not None else GenerationState.new(model)
    prompt = [int(t) for t in (prompt.tolist() if isinstance(prompt, mx.array) else prompt)]
    if not prompt and state.logits is None:
        raise GenerationError("the prompt is empty and there is no saved state to continue")
    sampler = sampler or make_sampler(0.0)
    logits_processors = logits_processors or []
    progress = prompt_progress_callback or (lambda *_: None)
    block = _block_size(model, prefill_step_size)

    def forward(tokens: mx.array):
        logits = model(tokens[None], cache=state.cache)[:, -1, :]
        state.tokens += tokens.size
        state.logits = logits
        return logits

    def sample(logits, pending: Optional[mx.array] = None):
        if logits_processors:
            history = mx.array(state.history, dtype=mx.int32)
            if pending is not None:  # the token just fed, not yet in state.history
                history = mx.concatenate([history, pending])
            for processor in logits_processors:
                logits = processor(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    def record(tokens: List[int]):
        state.history = (state.history + tokens)[-HISTORY:]

    with mx.stream(generation_stream):
        total, done = len(prompt), 0
        progress(0, total)
        while total - done > 1:
            n = min(block - state.tokens % block, total - done - 1)
            forward(mx.array(prompt[done : done + n], dtype=mx.int32))
            record(prompt[done : done + n])
            mx.eval([c.state for c in state.cache])
            done += n
            progress(done, total)
            mx.clear_cache()
        if done < total:
            logits = forward(mx.array(prompt[done:], dtype=mx.int32))
            record(prompt[done:])
        else:
            logits = state.logits
        if max_tokens == 0:
            mx.eval(logits, [c.state for c in state.cache])
            progress(total, total)
            return
        y, logprobs = sample(logits)
        mx.async_eval(y, logprobs)
        n = 0
        while True:
            # feed y before handing it out, so the state is complete at every yield; the next step is built
            # and evaluated asynchronously while the caller consumes y (mlx-lm's pipelining)
            next_y, next_logprobs = sample(forward(y), pending=y)
            mx.async_eval(next_y, next_logprobs)
            if n == 0:
                mx.eval(y)
                progress(total, total)
            token = y.item()
            record([token])
            yield token, logprobs
            n += 1
            if n == max_tokens:
                break
            if n % 256 == 0:
                mx.clear_cache()
            y, logprobs = next_y, next_logprobs


def _encode(tokenizer, prompt) -> List[int]:
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt)) if prompt else []
    if isinstance(prompt, mx.array):
        return [int(t) for t in prompt.tolist()]
    return [int(t) for t in prompt]


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, mx.array, List[int]],
    max_tokens: int = 256,
    **kwargs,
):
    """Yield ``mlx_lm.generate.GenerationResponse`` objects, as ``mlx_lm.stream_generate``.

    Args:
        model: a titans_mlx model (or any mlx-lm style model with a cache).
        tokenizer: the model's tokenizer (titans_mlx.tokenizer, or an mlx-lm TokenizerWrapper).
        prompt: text or token ids; may be empty when ``state`` holds a session to continue.
        max_tokens: tokens to generate; 0 only processes the prompt (one response, ``token`` None); -1 no limit.
        kwargs: ``sampler``, ``logits_processors``, ``state`` (a GenerationState, updated in place),
            ``prefill_step_size``, ``prompt_progress_callback``; see ``generate_step``.
    """
    from mlx_lm.generate import GenerationResponse, wired_limit, generation_stream

    if not isinstance(max_tokens, int) or max_tokens < -1:
        raise GenerationError(f"max_tokens must be >= 0 (or -1 for no limit), got {max_tokens!r}")
    unknown = set(kwargs) - {"sampler", "logits_processors", "state", "prefill_step_size", "prompt_progress_callback"}
    if unknown:
        raise GenerationError(f"unknown arguments: {', '.join(sorted(unknown))}")
    tokens = _encode(tokenizer, prompt)
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    eos = set(getattr(tokenizer, "eos_token_ids", None) or [])

    def response(text, token, logprobs, n, prompt_tps, tic, finish_reason):
        return GenerationResponse(
            text=text, token=token, logprobs=logprobs, from_draft=False, prompt_tokens=len(tokens),
            prompt_tps=prompt_tps, generation_tokens=n, generation_tps=n / max(time.perf_counter() - tic, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9, finish_reason=finish_reason,
        )

    with wired_limit(model, [generation_stream]):
        tic = time.perf_counter()
        generator = generate_step(tokens, model, max_tokens=max_tokens, **kwargs)
        if max_tokens == 0:
            for _ in generator:
                pass
            prompt_tps = len(tokens) / max(time.perf_counter() - tic, 1e-9)
            yield response("", None, None, 0, prompt_tps, time.perf_counter(), "length")
            return
        token, logprobs, n, prompt_tps = None, None, 0, 0.0
        try:
            for n, (token, logprobs) in enumerate(generator):
                if n == 0:
                    prompt_tps = len(tokens) / max(time.perf_counter() - tic, 1e-9)
                    tic = time.perf_counter()
                if token in eos:
                    break
                detokenizer.add_token(token)
                if n + 1 == max_tokens:
                    break
                yield response(detokenizer.last_segment, token, logprobs, n + 1, prompt_tps, tic, None)
        finally:
            generator.close()
        detokenizer.finalize()
        yield response(detokenizer.last_segment, token, logprobs, n + 1, prompt_tps, tic,
                       "stop" if token in eos else "length")


def generate(model: nn.Module, tokenizer, prompt, verbose: bool = False, **kwargs) -> str:
    """Generate text (all of it), as ``mlx_lm.generate``; with ``verbose`` stream it and print mlx-lm's stats."""
    if verbose:
        print("=" * 10)
    text, last = "", None
    for last in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(last.text, end="", flush=True)
        text += last.text
    if verbose:
        print()
        print("=" * 10)
        _print_stats(last)
    return text


def _print_stats(response, file=None):
    # mlx-lm's three stats lines, which its generate() prints inline (there is no function of its to call)
    file = file or sys.stdout
    print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec", file=file)
    print(f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec", file=file)
    print(f"Peak memory: {response.peak_memory:.3f} GB", file=file)


# ---- command line ----------------------------------------------------------------------------------------------------


def str2bool(value: str) -> bool:
    # not mlx_lm.generate.str2bool, which reads every string but "false"/"f" as true (`--verbose no` would be true)
    v = value.lower()
    if v in ("true", "1", "yes", "y", "on"):
        return True
    if v in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like argparse but without the usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def setup_arg_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m titans_mlx.generate", description="Generate text with a Titans (MLX) model.")
    p.add_argument("--model", default=None, help="Model directory (python -m convert output). Default: the bundled demo model")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", "-p", default=None, help=f"Prompt text ('-' reads stdin). Default: {DEFAULT_PROMPT!r}, "
                     "or nothing with --load-state")
    src.add_argument("--prompt-file", default=None, help="Read the prompt from a UTF-8 text file")
    p.add_argument("--max-tokens", "-m", type=int, default=DEFAULT_MAX_TOKENS,
                   help="Tokens to generate (0: only process the prompt, e.g. to --save-state a document)")
    p.add_argument("--temp", type=float, default=DEFAULT_TEMP, help="Sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=DEFAULT_TOP_P, help="Nucleus sampling probability")
    p.add_argument("--min-p", type=float, default=DEFAULT_MIN_P,
                   help="Min-p sampling (titans-pytorch's sample() default is --temp 1.5 --min-p 0.1)")
    p.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="Top-k sampling (0: off)")
    p.add_argument("--min-tokens-to-keep", type=int, default=1, help="Minimum tokens kept by min-p")
    p.add_argument("--repetition-penalty", type=float, default=None, help="Repetition penalty (mlx-lm's)")
    p.add_argument("--repetition-context-size", type=int, default=20, help="Tokens the repetition penalty looks at")
    p.add_argument("--seed", type=int, default=None, help="PRNG seed")
    p.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP_SIZE,
                   help="Prompt tokens per block (rounded down to a multiple of the model's segment length)")
    p.add_argument("--save-state", default=None, help="Write the session to this .safetensors file at the end")
    p.add_argument("--load-state", default=None, help="Continue the session saved in this file")
    p.add_argument("--verbose", type=str2bool, default=True, help="Print the ===== lines and stats (true/false)")
    return p


def read_text_file(path) -> str:
    """A prompt file's text; GenerationError (one line) for a missing, unreadable, binary or non-UTF-8 file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise GenerationError(f"prompt file {path} does not exist") from None
    except IsADirectoryError:
        raise GenerationError(f"prompt file {path} is a directory") from None
    except OSError as e:
        raise GenerationError(f"cannot read prompt file {path}: {e.strerror}") from None
    if b"\0" in data:
        raise GenerationError(f"prompt file {path} is binary, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise GenerationError(f"prompt file {path} is not UTF-8 text") from None


def _read_prompt(args) -> str:
    if args.prompt_file is not None:
        return read_text_file(args.prompt_file)
    if args.prompt == "-":
        return sys.stdin.read()
    if args.prompt is not None:
        return args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    return "" if args.load_state else DEFAULT_PROMPT


def _load_model(path_arg):
    from .io import load

    path = Path(path_arg) if path_arg is not None else DEFAULT_MODEL
    if path_arg is None and not path.is_dir():
        raise GenerationError(f"no --model given and the bundled demo model is missing ({path})")
    if not path.exists():
        raise GenerationError(f"model directory {path} does not exist")
    try:
        model, tokenizer = load(path)
    except PermissionError as e:
        raise GenerationError(f"cannot read model directory {path}: {e.strerror}") from None
    except (ValueError, OSError, KeyError, TypeError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GenerationError(f"cannot load model from {path}: {msg}") from None
    if tokenizer is None:
        raise GenerationError(f"model directory {path} has no tokenizer (tokenizer.json or tokenizer.model)")
    return model, tokenizer


def _check_args(args):
    if args.max_tokens < 0:
        raise GenerationError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    if args.temp < 0:
        raise GenerationError(f"--temp must be >= 0, got {args.temp}")
    if not 0 < args.top_p <= 1:
        raise GenerationError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not 0 <= args.min_p <= 1:
        raise GenerationError(f"--min-p must be in [0, 1], got {args.min_p}")
    if args.top_k < 0:
        raise GenerationError(f"--top-k must be >= 0, got {args.top_k}")
    if args.prefill_step_size < 1:
        raise GenerationError(f"--prefill-step-size must be >= 1, got {args.prefill_step_size}")
    if args.save_state is not None and not args.save_state.endswith(".safetensors"):
        raise GenerationError(f"--save-state {args.save_state}: the file name must end in .safetensors")


def _progress_bar(enabled: bool, block: int):
    """prompt_progress_callback drawing a tqdm bar on stderr when the prompt takes more than one block."""
    if not enabled:
        return None, lambda: None
    bar = None

    def callback(done, total):
        nonlocal bar
        if bar is None and total > block and 0 < done < total:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="tok", desc="prefill", file=sys.stderr, leave=False, dynamic_ncols=True)
        if bar is not None:
            bar.update(done - bar.n)

    def close():
        if bar is not None:
            bar.close()

    return callback, close


@contextmanager
def _ctrl_c():
    """Ctrl-C sets a flag, checked after each token and prefill block, instead of raising KeyboardInterrupt wherever
    the main thread happens to be (one raised inside a finaliser or a callback from MLX can be lost, and generation
    would run on); a second Ctrl-C raises KeyboardInterrupt at once."""
    pressed = []

    def handler(signum, frame):
        pressed.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, handler)
        installed = True
    except ValueError:  # not the main thread: Python's default stays
        installed = False
    try:
        yield pressed
    finally:
        if installed and previous is not None:  # None: a handler not set from Python, which cannot be put back
            signal.signal(signal.SIGINT, previous)


def main(argv=None) -> int:
    args = setup_arg_parser().parse_args(argv)
    try:
        _check_args(args)
        prompt = _read_prompt(args)
        model, tokenizer = _load_model(args.model)
        state = load_state(args.load_state, model, tokenizer) if args.load_state else GenerationState.new(model)
        if not prompt and state.logits is None:
            raise GenerationError(f"the prompt is empty and {args.load_state} holds no next-token logits (a plain "
                                  "mlx-lm prompt cache): give a prompt to continue it" if args.load_state else
                                  "the prompt is empty")
    except GenerationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    if args.seed is not None:
        mx.random.seed(args.seed)
    sampler = make_sampler(args.temp, args.top_p, args.min_p, args.min_tokens_to_keep, top_k=args.top_k)
    processors = make_logits_processors(repetition_penalty=args.repetition_penalty,
                                        repetition_context_size=args.repetition_context_size)
    callback, close_bar = _progress_bar(args.verbose, args.prefill_step_size)
    if args.verbose:
        print("=" * 10, flush=True)
    last, interrupted = None, False
    with _ctrl_c() as pressed:

        def progress(done, total):
            if pressed:
                raise KeyboardInterrupt
            if callback is not None:
                callback(done, total)

        try:
            for last in stream_generate(model, tokenizer, prompt, args.max_tokens, sampler=sampler,
                                        logits_processors=processors, state=state,
                                        prefill_step_size=args.prefill_step_size, prompt_progress_callback=progress):
                close_bar()
                print(last.text, end="", flush=True)
                if pressed:
                    break
        except KeyboardInterrupt:
            interrupted = True
        except GenerationError as e:
            close_bar()
            print(f"\nerror: {e}", file=sys.stderr)
            return 1
        interrupted = interrupted or bool(pressed)
    close_bar()
    if interrupted:
        print(flush=True)
        print("[interrupted]" + (" (state not saved)" if args.save_state else ""), file=sys.stderr)
        return 130
    if args.verbose:
        print()
        print("=" * 10)
        _print_stats(last)
    if args.save_state:
        try:
            save_state(args.save_state, state, model, tokenizer, model_path=args.model or DEFAULT_MODEL)
        except (GenerationError, OSError) as e:
            print(f"error: cannot save state to {args.save_state}: {e}", file=sys.stderr)
            return 1
        if args.verbose:
            print(f"State: {state.tokens} tokens saved to {args.save_state}")
    return 0


if __name__ == "__main__":
    from .blas import run_cli

    sys.exit(run_cli("titans_mlx.generate", main))
