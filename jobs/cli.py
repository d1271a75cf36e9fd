"""``lsn intervene ppl|generate``, ``lsn finetune`` and ``lsn demo``: what each runs (their options:
:mod:`jobs.options`)."""

from __future__ import annotations

from harvester.options import Command, Group
from jobs.options import DemoOptions, FinetuneOptions, GenerateOptions, PPLOptions
from jobs.options import split_langs as _langs


def finetune(options: FinetuneOptions) -> None:
    from jobs.finetune import FinetuneJob, run_finetune
    from jobs.generate import markdown

    import pandas as pd

    o = options
    result = run_finetune(FinetuneJob(
        model=o.model, mask=o.mask, langs=_langs(o.lang, "--lang"), task=o.task, data=o.data, out=o.out,
        controls=_langs(o.control, "--control"), train_lang=o.train_lang,
        eval_langs=_langs(o.eval_langs, "--eval-langs"), eval_data=o.eval_data, steps=o.steps, rank=o.rank,
        alpha=o.alpha, lr=o.lr, batch_size=o.batch_size, seq_len=o.seq_len, attention_lora=o.attention_lora,
        intervene=None if o.intervene == "none" else o.intervene, max_train=o.max_train, max_eval=o.max_eval,
        seed=o.seed, dtype=o.dtype, device=o.device, use_ray=not o.no_ray, address=o.address,
        progress=not o.no_progress, store=o.store, allow_other_model=o.allow_other_model,
        lora_modules=_langs(o.lora_modules, "--lora-modules"),
        attention_modules=_langs(o.attention_modules, "--attention-modules"), xnli_head=o.xnli_head,
        xquad_format=o.xquad_format, xquad_split=o.xquad_split, max_example_tokens=o.max_example_tokens,
        special_tokens=o.special_tokens, prompt_loss=o.prompt_loss))
    frame = pd.DataFrame.from_records(result["table"])
    print(markdown(frame[["lang", "condition", "eval_lang", "metric", "value", "intervened"]]), end="")
    print(f"wrote {o.out}/results.json, results.csv, results.md and one adapter per condition")


def demo(options: DemoOptions) -> None:
    from jobs.demo import known_answer, run_demo

    report = run_demo(options.out, actors=options.actors, progress=not options.no_progress)
    check = known_answer(report.parent / "ppl" / "ppl.csv")
    print(f"own neurons hit their language hardest for {100 * check['diagonal_share']:.0f}% of languages; "
          f"random controls under half of that: {sum(check['below_half'].values())} of {len(check['below_half'])}")
    print(f"wrote {report}")


def generate(options: GenerateOptions) -> None:
    from jobs.generate import GenerateJob, flat_table, markdown, run_generate

    o = options
    result = run_generate(GenerateJob(**o.job(), prompts=o.prompts, max_new_tokens=o.max_new_tokens,
                                      sample=o.sample, temperature=o.temperature, top_p=o.top_p))
    print(markdown(flat_table(result["table"])[["intervened", "prompt_lang", "in_prompt_lang", "length"]]), end="")
    print(f"wrote {o.out}/generate.csv, generate.md, generate.json")


def ppl(options: PPLOptions) -> None:
    from jobs.ppl import OUTPUTS, PPLJob, run_ppl, summary

    o = options
    result = run_ppl(PPLJob(**o.job(), corpus=o.corpus, seq_len=o.seq_len, batch_size=o.batch_size,
                            max_tokens_per_lang=o.max_tokens_per_lang, aggregate=o.aggregate))
    print(summary(result))
    print(f"wrote {o.out}/{', '.join(OUTPUTS)}")


COMMANDS = {
    "intervene": Group("switch a mask's neurons off (or set, or steer them) and measure", "intervene_command", {
        "ppl": Command("perplexity matrix: rows intervened languages, columns evaluated languages", PPLOptions, ppl),
        "generate": Command("generation per prompt language, without and with each language's neurons",
                            GenerateOptions, generate)}),
    "finetune": Command("LoRA on a language's neurons vs random neurons, full LoRA and no fine-tuning",
                        FinetuneOptions, finetune),
    "demo": Command("train (once) the demo model, then harvest, LAPE, PPL matrix, generation, report",
                    DemoOptions, demo),
}
