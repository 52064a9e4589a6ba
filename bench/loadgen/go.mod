module ocicache/bench/loadgen

go 1.22
