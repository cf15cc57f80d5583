//! Compiling, validating and simulating pipeline schedules at the paper's scale
//! (PP = 16) with many micro-batches: the issue asks for well under a second at 512.
//!
//! `cargo bench -p flotilla-coordinator --bench schedule`

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use flotilla_coordinator::schedule::{Costs, ScheduleKind, ScheduleSpec, compile, simulate, validate};
use std::hint::black_box;

fn schedules(c: &mut Criterion) {
    let mut group = c.benchmark_group("schedule");
    group.sample_size(10);
    for kind in ScheduleKind::ALL {
        for micro_batches in [64u32, 512] {
            let spec = ScheduleSpec { kind, pp: 16, micro_batches };
            group.bench_with_input(
                BenchmarkId::new(format!("compile+validate/{kind}/pp16"), micro_batches),
                &spec,
                |b, spec| b.iter(|| validate(&compile(black_box(spec)).unwrap()).unwrap()),
            );
        }
    }
    let schedule =
        compile(&ScheduleSpec { kind: ScheduleKind::DualPipe, pp: 16, micro_batches: 512 }).unwrap();
    group.bench_function("simulate/dualpipe/pp16/512", |b| {
        b.iter(|| simulate(black_box(&schedule), &Costs::default()).unwrap())
    });
    group.finish();
}

criterion_group!(benches, schedules);
criterion_main!(benches);
