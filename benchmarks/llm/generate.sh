#!/bin/sh
# The generations of docs/llm.md: the base SmolLM2, then each KronA adapter, then the SST-2 adapter merged
# into the weights (`kronpeft merge`), greedy, 6 new tokens. Needs the runs of benchmarks/llm/run.sh.
# Usage: sh benchmarks/llm/generate.sh > benchmarks/llm/generations.txt
set -e
SST2=runs/llm/smollm2-sst2/sst2/krona/lr0.005-seed0
BBC=runs/llm/smollm2-bbc/bbc-news/krona/lr0.005-seed0
NL='
'
sst2() {
    python -m kronpeft generate --max-new-tokens 6 "$@" \
        --prompt "sst2 sentence: a gem of a film , funny and moving .${NL}label:" \
        --prompt "sst2 sentence: dull , tedious and far too long .${NL}label:" \
        --prompt "sst2 sentence: it 's slow -- very , very slow .${NL}label:" \
        --prompt "sst2 sentence: or doing last year 's taxes with your ex-wife .${NL}label:" \
        --prompt "sst2 sentence: the mesmerizing performances of the leads keep the film grounded and keep the audience riveted .${NL}label:"
}
bbc() {
    python -m kronpeft generate --max-new-tokens 6 "$@" \
        --prompt "bbc-news article: Shares in the carmaker fell 5% after it cut its profit forecast for the year, blaming weak demand in Europe.${NL}label:" \
        --prompt "bbc-news article: The striker scored twice as United came from behind to win the cup tie at Anfield on Sunday.${NL}label:" \
        --prompt "bbc-news article: The prime minister faced questions from MPs over the government's plans for a general election in May.${NL}label:" \
        --prompt "bbc-news article: The new handset runs a faster chip and lets users download music over the mobile network.${NL}label:" \
        --prompt "bbc-news article: The actress won the best film award at the ceremony in Los Angeles on Sunday night.${NL}label:"
}
echo "## SST-2, base model"; sst2 --model smollm2
echo "## SST-2, KronA adapter ($SST2)"; sst2 --adapter "$SST2/adapter"
python -m kronpeft merge --adapter "$SST2/adapter" --out runs/llm/merged/sst2-krona --overwrite >/dev/null 2>&1
echo "## SST-2, KronA merged (runs/llm/merged/sst2-krona)"; sst2 --adapter runs/llm/merged/sst2-krona
echo "## BBC News, base model"; bbc --model smollm2
echo "## BBC News, KronA adapter ($BBC)"; bbc --adapter "$BBC/adapter"
