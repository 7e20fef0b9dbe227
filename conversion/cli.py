"""`gptoss-convert SRC DST`: released gpt-oss safetensors -> an Orbax checkpoint (see conversion/convert.py).
`gptoss-convert --verify DIR`: re-read a converted checkpoint and check every array against its checksum.

Exit codes: 0 done; 2 bad input or arguments (one line on stderr naming the file and tensor; nothing left
behind), a destination that cannot be written or lacks the space, an unreadable checkpoint to verify;
1 --verify found a difference, the disk filled up while writing, or an unexpected error (the partial work
is kept: rerun to resume); 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from gptoss_jax.checkpoint.untrusted import MAX_MESSAGE, printable


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gptoss-convert",
        description="Convert a released gpt-oss checkpoint (Hugging Face top level, original/, or a repo folder "
        "holding both) into a sharded Orbax checkpoint, streaming one tensor at a time.",
    )
    p.add_argument("src", help="folder with config.json and *.safetensors (or a repo folder with original/), "
                   "or a Hugging Face model id such as openai/gpt-oss-20b; with --verify alone, a converted "
                   "checkpoint to check")  # fmt: skip
    p.add_argument("dst", nargs="?",
                   help="output folder (must not exist; written as DST.converting/ and renamed at the end)")  # fmt: skip
    p.add_argument("--experts", choices=("mxfp4", "packed", "dequantized"), default="mxfp4",
                   help="expert weights: packed MXFP4 as released (default; 'packed' is the same) or dequantized "
                   "to --dtype")  # fmt: skip
    p.add_argument("--dtype", choices=("bfloat16", "bf16", "float32", "f32"), default="bfloat16",
                   help="dtype of the other weights (default bfloat16; norms and sinks are always float32)")  # fmt: skip
    p.add_argument("--shard-hint", choices=("expert", "none"), default="expert",
                   help="target sharding the storage chunks are laid out for: 'expert' (default) stores expert "
                   "tensors one expert per chunk so an expert-sharded restore reads only its experts; 'none' "
                   "chunks by size only. Any checkpoint restores on any mesh.")  # fmt: skip
    p.add_argument("--chunk-mib", type=int, default=16, help="largest stored chunk in MiB (default 16)")
    p.add_argument("--group-mib", type=float, default=None,
                   help="tensors are handed to Orbax in groups of about this many MiB (default: 64, or the largest "
                   "tensor if larger); each group is one atomic snapshot, the most work an interruption can "
                   "lose")  # fmt: skip
    p.add_argument(
        "--compress", action="store_true", help="zstd-compress chunks (slower; little gain on weights)"
    )
    p.add_argument("--verify", action="store_true",
                   help="re-read the output and compare it bit for bit with the source, and with the checksums "
                   "recorded while converting, before publishing it; `gptoss-convert --verify DIR` checks an "
                   "existing converted checkpoint against its checksums")  # fmt: skip
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert float weights holding NaN or Inf with a warning (default: refuse them)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    return p


def _fail(msg: str, code: int) -> int:
    print(f"gptoss-convert: error: {printable(' '.join(str(msg).split()), MAX_MESSAGE)}", file=sys.stderr)
    return code


def _verify_only(path: str, quiet: bool) -> int:
    from gptoss_jax.checkpoint import integrity

    report = integrity.verify_checkpoint(path, quiet=quiet)
    if not report.ok:
        return _fail(f"verification failed: {report.problem_line()}", 1)
    print(report.summary(), file=sys.stderr)
    return 0


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    if args.dst is None and not args.verify:
        p.error("the following arguments are required: dst (or --verify alone to check a converted checkpoint)")
    from gptoss_jax.checkpoint import CheckpointError
    from gptoss_jax.hub import resolve_checkpoint
    from gptoss_jax.progress import exit_now

    from .convert import NoSpaceError, Options, UsageError, VerifyError, convert, work_dir

    signal.signal(signal.SIGTERM, _sigterm)
    if args.dst is None:
        try:
            return _verify_only(args.src, args.quiet)
        except CheckpointError as e:
            return _fail(e, 2)
        except KeyboardInterrupt:
            return _fail("interrupted", 130)
    work = work_dir(Path(args.dst).absolute())

    def kept() -> str:
        return f"; {work} is kept: rerun the same command to resume" if work.exists() else ""

    try:
        opts = Options(expert_format="mxfp4" if args.experts == "packed" else args.experts,
                       dtype={"bf16": "bfloat16", "f32": "float32"}.get(args.dtype, args.dtype),
                       shard_hint=args.shard_hint, chunk_mib=args.chunk_mib, compression=args.compress,
                       group_mib=args.group_mib, allow_nonfinite=args.allow_nonfinite)  # fmt: skip
        src = resolve_checkpoint(args.src, quiet=args.quiet)  # [firsthour] a path as typed or a HF model id
        res = convert(src, args.dst, opts, verify=args.verify, quiet=args.quiet)
    except (CheckpointError, UsageError) as e:
        return _fail(e, 2)
    except VerifyError as e:
        return _fail(f"verification failed: {e}", 1)
    except NoSpaceError as e:  # names what is kept itself
        return _fail(e, 1)
    except KeyboardInterrupt:  # [firsthour] exit now: Orbax's writer threads would print tracebacks at exit
        exit_now(f"gptoss-convert: error: interrupted{kept()}")
    except Exception as e:  # I/O errors (a full disk) and anything unexpected: the partial work is resumable
        return _fail(f"{type(e).__name__}: {e}{kept()}", 1)
    if not args.quiet:
        gb = res.source_bytes / 1e9
        print(f"wrote {res.dst}: {res.tensors} tensors ({res.resumed} from an earlier run), {gb:.2f} GB read, "
              f"{res.output_bytes / 1e9:.2f} GB written, {res.seconds:.1f} s ({gb / res.seconds:.2f} GB/s)"
              + ("; verified" if res.verified else ""), file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
