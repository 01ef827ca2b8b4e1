module manifold.bench/go-bff

go 1.19
