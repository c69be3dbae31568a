"""`python -m bench serve`: time to first token of stock `mlx_lm.server --trust-remote-code` serving a Titans model,
for the first turn of a conversation about a long document and for follow-up turns that reuse its cached state.

The server's prompt cache keeps a model's cache after each answer (prompt + answer). A Titans cache is a few MB
whatever the document's length, and cannot be trimmed, so a follow-up is served from it only when its prompt extends
the previous prompt and answer exactly. Two ways are measured:
- `completions`: /v1/completions, each follow-up's prompt = the previous prompt + answer + a new question;
- `chat`: /v1/chat/completions with the server started with `--chat-template` CHAT_TEMPLATE below, whose rendering
  of a conversation extends the previous turn's prompt + answer. (Without a template mlx-lm renders chats with its
  `convert_chat`, which puts a space after "ASSISTANT:" that the generation prompt lacks, so no turn extends the
  previous one and every follow-up reads the whole document again.)
"""

from __future__ import annotations

import http.client
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import env as E

# every user turn ends with the generation prompt and an answer is appended verbatim: turn k+1 extends turn k + answer
CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}\n"
                 "{% else %}USER: {{ m['content'] }}\nASSISTANT:{% endif %}{% endfor %}")
QUESTIONS = [" What came after that?", " And then what happened?", " Who spoke next?", " What did they say?",
             " Where did they go?"]


def add_parser(sub, int_list):
    m = sub.add_parser("serve", help="mlx_lm.server time to first token: first turn vs follow-ups on the cached state")
    m.add_argument("--model", default=None, help="model directory (default: the bundled demo model)")
    m.add_argument("--tokens", type=int, default=32768, help="document length in tokens (default 32768)")
    m.add_argument("--follow-ups", type=int, default=3, help="follow-up turns; their median is reported (default 3)")
    m.add_argument("--max-tokens", type=int, default=16, help="answer length per turn (default 16)")
    m.add_argument("--modes", default="completions,chat", help="completions, chat or both (default both)")
    m.add_argument("--blas", default="stock", help="stock, openblas or a libblas.so path (the server process)")
    m.add_argument("--threads", type=int, default=1)
    m.add_argument("--timeout", type=float, default=3600, help="seconds per request (default 3600)")
    m.add_argument("--out", default=str(E.ROOT / "bench" / "results"))
    m.add_argument("--name", default=None)


def document(tokenizer, n: int) -> str:
    """About n tokens of numbered plain sentences (deterministic), cut at n tokens."""
    parts, i = [], 0
    while True:
        parts.append(f"Verse {i}: and the {['man', 'city', 'river', 'king'][i % 4]} saw {i * 7 % 1000} lights. ")
        i += 1
        if i % 64 == 0 and len(tokenizer.encode("".join(parts))) >= n:
            break
    return tokenizer.decode(tokenizer.encode("".join(parts))[:n])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(port: int, path: str, body: dict, timeout: float) -> dict:
    """POST a streaming request; seconds to the first text, the text, and the final usage."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    body = dict(body, stream=True, stream_options={"include_usage": True}, temperature=0)
    t0 = time.perf_counter()
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    if r.status != 200:
        raise RuntimeError(f"{path}: HTTP {r.status}: {r.read()[:300]!r}")
    ttft, text, usage = None, "", None
    for line in r:
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        chunk = json.loads(data)
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices", []):
            piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
            if piece and ttft is None:
                ttft = time.perf_counter() - t0
            text += piece
    conn.close()
    return {"ttft_s": ttft, "total_s": time.perf_counter() - t0, "text": text, "usage": usage}


def _start_server(model: str, port: int, env: dict, chat_template: str | None, log_path: Path):
    cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", model, "--trust-remote-code", "--host", "127.0.0.1",
           "--port", str(port)]
    if chat_template:
        cmd += ["--chat-template", chat_template]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=E.ROOT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlx_lm.server exited: {log_path.read_text()[-1000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlx_lm.server did not come up in 300 s")


def _conversation(mode: str, port: int, doc: str, args) -> list[dict]:
    turns = []
    if mode == "completions":
        prompt = doc
        for k in range(args.follow_ups + 1):
            res = _stream(port, "/v1/completions", {"prompt": prompt, "max_tokens": args.max_tokens}, args.timeout)
            turns.append(res)
            prompt = prompt + res["text"] + QUESTIONS[k % len(QUESTIONS)]
    else:
        messages = [{"role": "user", "content": doc}]
        for k in range(args.follow_ups + 1):
            res = _stream(port, "/v1/chat/completions", {"messages": messages, "max_tokens": args.max_tokens},
                          args.timeout)
            turns.append(res)
            messages = messages + [{"role": "assistant", "content": res["text"]},
                                   {"role": "user", "content": QUESTIONS[k % len(QUESTIONS)].strip()}]
    for t in turns:
        u = t.pop("usage") or {}
        t["prompt_tokens"] = u.get("prompt_tokens")
        t["cached_tokens"] = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
    return turns


def _cache_bytes(model, tokenizer, doc: str) -> int:
    """nbytes of the model's cache after the whole document (read here, in blocks, as titans_mlx.generate does)."""
    from titans_mlx.generate import GenerationState, stream_generate

    state = GenerationState.new(model)
    for _ in stream_generate(model, tokenizer, doc, max_tokens=0, state=state):
        pass
    return sum(c.nbytes for c in state.cache)


def run_serve(args, argv, main) -> int:
    from titans_mlx.generate import DEFAULT_MODEL
    from titans_mlx.io import load

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"completions", "chat"}:
        raise main.UserError(f"--modes: expected completions and/or chat, got {args.modes!r}")
    for name in ("tokens", "max_tokens", "threads"):
        if getattr(args, name) < 1:
            raise main.UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.follow_ups < 1:
        raise main.UserError("--follow-ups must be >= 1")
    model_dir = str(Path(args.model) if args.model else DEFAULT_MODEL)
    try:
        model, tokenizer = load(model_dir)
    except (ValueError, OSError) as e:
        raise main.UserError(f"--model: {e}")
    blas_extra, blas_tag = main._blas_env(args)
    out_dir = main.make_out_dir(args)
    name = args.name or f"serve_{blas_tag}_t{args.tokens // 1024}k"
    doc_text = document(tokenizer, args.tokens)
    doc = {"benchmark": "server_ttft", "schema": 1, "name": name, "environment": E.environment(argv),
           "config": {"model": model_dir, "tokens": args.tokens, "follow_ups": args.follow_ups,
                      "max_tokens": args.max_tokens, "modes": modes, "blas": args.blas, "threads": args.threads,
                      "chat_template": CHAT_TEMPLATE},
           "blas_preload": blas_extra.get("LD_PRELOAD"), "cache_bytes": _cache_bytes(model, tokenizer, doc_text),
           "results": []}
    del model
    failed = False
    for mode in modes:
        port = _free_port()
        log = out_dir / f".{name}_{mode}_server.log"
        print(f"[bench] serve {mode}: {args.tokens} tokens ...", end="", flush=True, file=sys.stderr)
        proc = _start_server(model_dir, port, main._worker_env(blas_extra, args.threads),
                             CHAT_TEMPLATE if mode == "chat" else None, log)
        try:
            turns = _conversation(mode, port, doc_text, args)
            libs = E.mapped_blas_libraries(proc.pid)  # what the server process itself runs on
            res = {"mode": mode, "status": "ok", "impl": "mlx", "versions": E.versions(), "turns": turns,
                   "blas": {"description": E.describe_blas(libs), "openblas_config": E.openblas_config(libs or [])}}
        except (RuntimeError, OSError, ValueError) as e:
            failed = True
            res = {"mode": mode, "status": "error", "error": str(e)}
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.unlink(missing_ok=True)
        doc["results"].append(res)
        if res["status"] == "ok":
            s = _mode_summary(res)
            print(f" first {s['first_ttft_s']:.2f} s, follow-ups {s['follow_up_ttft_s']:.3f} s "
                  f"({s['speedup']:.0f}x)", file=sys.stderr)
        else:
            print(f" FAILED: {res['error']}", file=sys.stderr)
    main.publish(doc, out_dir / name, False, sys.modules[__name__])
    return 1 if failed else 0


def _mode_summary(res: dict) -> dict:
    first, rest = res["turns"][0], res["turns"][1:]
    follow = statistics.median(t["ttft_s"] for t in rest)
    return {"mode": res["mode"], "first_ttft_s": first["ttft_s"], "first_prompt_tokens": first["prompt_tokens"],
            "follow_up_ttft_s": follow, "speedup": first["ttft_s"] / follow,
            "follow_up_cached_tokens": [t["cached_tokens"] for t in rest],
            "follow_up_prompt_tokens": [t["prompt_tokens"] for t in rest]}


def summary(doc: dict) -> list:
    return [_mode_summary(r) for r in doc["results"] if r.get("status") == "ok"]


def markdown(doc: dict) -> str:
    c = doc["config"]
    lines = [f"# mlx_lm.server time to first token: {c['tokens']:,}-token document, then follow-ups", "",
             f"Model `{c['model']}`; greedy; answers of {c['max_tokens']} tokens; {c['follow_ups']} follow-ups "
             "(median); one run.", ""]
    lines += ["| endpoint | first turn TTFT | follow-up TTFT | speedup | follow-up prompt / cached tokens |",
              "|---|---:|---:|---:|---|"]
    for s in doc.get("summary") or summary(doc):
        pairs = ", ".join(f"{p:,}/{k:,}" for p, k in zip(s["follow_up_prompt_tokens"], s["follow_up_cached_tokens"]))
        lines.append(f"| {s['mode']} | {s['first_ttft_s']:.2f} s | {s['follow_up_ttft_s']:.3f} s | "
                     f"{s['speedup']:.0f}x | {pairs} |")
    for r in doc["results"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['mode']} | failed: {r.get('error')} | | | |")
    lines += ["", f"Cache size (the state a follow-up reuses) after the document: {doc['cache_bytes'] / 2**20:.2f} MiB."]
    lines += E.environment_lines(doc, {"mlx": "mlx_lm.server"})
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: str) -> bool:
    return False
