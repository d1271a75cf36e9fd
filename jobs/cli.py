"""``lsn intervene ppl|generate`` and ``lsn demo``."""

from __future__ import annotations

from harvester.devices import add_flags as add_device_flags
from harvester.errors import HarvestError

COMMANDS = ("intervene", "demo", "finetune")


def _common(p, positive) -> None:
    p.add_argument("--model", required=True, help="local path, hub id, or tiny:ARCH")
    p.add_argument("--mask", required=True, help="mask file (.npz, from lsn analyze or lsn mask import)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--mode", default="zero", help="zero | mean | p10 | p90 | value:X | add:X")
    p.add_argument("--controls", type=int, default=1, help="random-control rows per language (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random controls")
    p.add_argument("--langs", default=None, help="comma-separated mask languages (rows) and evaluated languages")
    p.add_argument("--store", default=None, help="store for mean/p10/p90 and the site (default: the mask's)")
    add_device_flags(p)
    p.add_argument("--actors", type=positive, default=None, help="model actors (default: one per GPU, 1 on CPU); "
                   "one actor on this machine runs in this process, 2 or more on Ray")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS; without either, "
                   "several actors run on an embedded local Ray instance)")
    p.add_argument("--no-ray", action="store_true", help="run every row in this process, even with --actors 2+")
    p.add_argument("--no-progress", action="store_true")
    _allow_other(p)


def _allow_other(p) -> None:
    p.add_argument("--allow-other-model", action="store_true", help="apply a mask (or store statistics) from "
                   "another model than --model: a deliberate transfer (refused otherwise)")


def add_commands(sub, positive) -> None:
    i = sub.add_parser("intervene", help="switch a mask's neurons off (or set, or steer them) and measure")
    what = i.add_subparsers(dest="intervene_command", required=True, parser_class=type(i))
    p = what.add_parser("ppl", help="perplexity matrix: rows intervened languages, columns evaluated languages")
    _common(p, positive)
    p.add_argument("--corpus", action="append", required=True, help="evaluation corpus spec (repeatable)")
    p.add_argument("--seq-len", type=positive, default=256)
    p.add_argument("--batch-size", type=positive, default=8)
    p.add_argument("--max-tokens-per-lang", type=positive, default=None)
    f = sub.add_parser("finetune", help="LoRA on a language's neurons vs random neurons, full LoRA and no fine-tuning")
    f.add_argument("--model", required=True)
    f.add_argument("--mask", required=True, help="mask file (.npz)")
    f.add_argument("--lang", required=True, help="mask language(s) whose neurons are trained, comma-separated")
    f.add_argument("--task", required=True, help="clm | xnli | xquad")
    f.add_argument("--data", required=True, help="clm: a corpus spec; xnli/xquad: a hub id or DIR/{lang}/{split}.jsonl")
    f.add_argument("--out", required=True)
    f.add_argument("--control", default="none", help="comma-separated: none (the language's neurons) | random | "
                   "full | base (no fine-tuning)")
    f.add_argument("--train-lang", default="en", help="xnli/xquad: the language trained on")
    f.add_argument("--eval-langs", default=None, help="xnli/xquad: comma-separated languages evaluated zero-shot")
    f.add_argument("--eval-data", default=None, help="evaluation data (default: --data)")
    f.add_argument("--steps", type=positive, default=100)
    f.add_argument("--rank", type=positive, default=8)
    f.add_argument("--alpha", type=float, default=16.0)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--batch-size", type=positive, default=8)
    f.add_argument("--seq-len", type=positive, default=256)
    f.add_argument("--attention-lora", action="store_true", help="also ordinary LoRA on attention")
    f.add_argument("--intervene", default="zero", help="test-time intervention on the evaluated language's neurons "
                   "(a --mode of lsn intervene), or none")
    f.add_argument("--store", default=None, help="store of --intervene mean|p10|p90 statistics (default: the mask's)")
    f.add_argument("--max-train", type=positive, default=None)
    f.add_argument("--max-eval", type=positive, default=None)
    f.add_argument("--seed", type=int, default=0)
    add_device_flags(f)
    f.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else an embedded "
                   "local instance)")
    f.add_argument("--no-ray", action="store_true", help="run every condition in this process, without Ray's "
                   "start-up; peak memory is then the process's, not each condition's")
    f.add_argument("--no-progress", action="store_true")
    _allow_other(f)
    d = sub.add_parser("demo", help="train (once) the demo model, then harvest, LAPE, PPL matrix, generation, report")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--actors", type=positive, default=2)
    d.add_argument("--no-progress", action="store_true")
    g = what.add_parser("generate", help="generation per prompt language, without and with each language's neurons")
    _common(g, positive)
    g.add_argument("--prompts", required=True, help='JSONL file, one {"lang": ..., "prompt": ...} per line')
    g.add_argument("--max-new-tokens", type=positive, default=32)
    g.add_argument("--sample", action="store_true", help="sample (seeded) instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)


def _langs(text: str | None) -> list[str] | None:
    langs = [x.strip() for x in text.split(",") if x.strip()] if text is not None else None
    if text is not None and not langs:
        raise HarvestError("--langs is empty")
    return langs


def run(args) -> None:
    if args.command == "finetune":
        from jobs.finetune import FinetuneJob, run_finetune
        from jobs.generate import markdown

        import pandas as pd

        result = run_finetune(FinetuneJob(
            model=args.model, mask=args.mask, langs=_langs(args.lang), task=args.task, data=args.data, out=args.out,
            controls=_langs(args.control), train_lang=args.train_lang, eval_langs=_langs(args.eval_langs),
            eval_data=args.eval_data, steps=args.steps, rank=args.rank, alpha=args.alpha, lr=args.lr,
            batch_size=args.batch_size, seq_len=args.seq_len, attention_lora=args.attention_lora,
            intervene=None if args.intervene == "none" else args.intervene, max_train=args.max_train,
            max_eval=args.max_eval, seed=args.seed, dtype=args.dtype, device=args.device, use_ray=not args.no_ray,
            address=args.address, progress=not args.no_progress, store=args.store,
            allow_other_model=args.allow_other_model))
        frame = pd.DataFrame.from_records(result["table"])
        print(markdown(frame[["lang", "condition", "eval_lang", "metric", "value", "intervened"]]), end="")
        print(f"wrote {args.out}/results.json, results.csv, results.md and one adapter per condition")
    elif args.command == "demo":
        from jobs.demo import known_answer, run_demo

        report = run_demo(args.out, actors=args.actors, progress=not args.no_progress)
        check = known_answer(report.parent / "ppl" / "ppl.csv")
        print(f"own neurons hit their language hardest for {100 * check['diagonal_share']:.0f}% of languages; "
              f"random controls under half of that: {sum(check['below_half'].values())} of {len(check['below_half'])}")
        print(f"wrote {report}")
    elif args.command == "intervene" and args.intervene_command == "generate":
        from jobs.generate import GenerateJob, flat_table, markdown, run_generate

        result = run_generate(GenerateJob(
            model=args.model, mask=args.mask, prompts=args.prompts, out=args.out, mode=args.mode,
            controls=args.controls, seed=args.seed, langs=_langs(args.langs), store=args.store, dtype=args.dtype,
            device=args.device, max_new_tokens=args.max_new_tokens,
            sample=args.sample, temperature=args.temperature, top_p=args.top_p, actors=args.actors,
            use_ray=not args.no_ray, address=args.address, progress=not args.no_progress,
            allow_other_model=args.allow_other_model))
        print(markdown(flat_table(result["table"])[["intervened", "prompt_lang", "in_prompt_lang", "length"]]), end="")
        print(f"wrote {args.out}/generate.csv, generate.md, generate.json")
    elif args.command == "intervene" and args.intervene_command == "ppl":
        from jobs.ppl import OUTPUTS, PPLJob, run_ppl, summary

        langs = _langs(args.langs)
        result = run_ppl(PPLJob(model=args.model, mask=args.mask, corpus=args.corpus, out=args.out, mode=args.mode,
                                controls=args.controls, seed=args.seed, langs=langs, store=args.store,
                                dtype=args.dtype, device=args.device, seq_len=args.seq_len,
                                batch_size=args.batch_size, max_tokens_per_lang=args.max_tokens_per_lang,
                                actors=args.actors, use_ray=not args.no_ray, address=args.address,
                                progress=not args.no_progress, allow_other_model=args.allow_other_model))
        print(summary(result))
        print(f"wrote {args.out}/{', '.join(OUTPUTS)}")
