//! Registry benchmarks (written next).

fn main() {}
