# Sourced by evaluate_shipped.sh and evaluate_full_test.sh (needs $RD, the robustdeq command).
# run_shards OUT PREFIX K JOBS ARGS...: 'robustdeq evaluate ARGS' as K shards of one thread each,
# at most JOBS at a time, in PREFIX-<i>/ with logs appended to PREFIX-<i>.log, then merged image for image
# into OUT (robustdeq merge-shards; docs/evaluation.md, "Sharding a large evaluation"). Each shard
# resumes job by job when rerun; a failed shard stops everything before the merge, naming its log.
run_shards() {
    local out=$1 prefix=$2 k=$3 jobs=$4 i running=0 failed=0 shards=()
    shift 4
    mkdir -p "$(dirname "$prefix")"  # the logs sit beside the shard folders, on a fresh checkout too
    for ((i = 0; i < k; i++)); do
        shards+=("$prefix-$i")
        echo "shard $i/$k of $out: log in $prefix-$i.log"
        "$RD" evaluate "$@" --shard "$i/$k" --threads 1 --no-progress --out "$prefix-$i" >> "$prefix-$i.log" 2>&1 &
        running=$((running + 1))
        if [ "$running" -ge "$jobs" ]; then
            wait -n || failed=1
            running=$((running - 1))
        fi
    done
    for ((; running > 0; running--)); do wait -n || failed=1; done
    if [ "$failed" -ne 0 ]; then
        echo "a shard of $out failed: see the logs $prefix-*.log; rerun to resume it" >&2
        return 1
    fi
    "$RD" merge-shards --out "$out" "${shards[@]}"
}
