//! Data-plane benchmarks, each beside the reference it is judged against:
//! - ring all-reduce (f32 sum) across 2 and 4 ranks in this process over loopback TCP, at
//!   4 MiB and 64 MiB per rank, as *bus bandwidth* = 2·(n−1)/n · bytes / time (the bytes
//!   each rank must send and receive, NCCL's convention);
//! - the reference: raw loopback TCP, one stream on the same runtime, writing N bytes and
//!   reading them on the other end, N = the same sizes.
//!
//! Every case runs on one tokio multi-thread runtime with 2 worker threads. After the
//! criterion groups, the medians and the ratio (all-reduce bus bandwidth / single-stream
//! TCP throughput, same size) are printed from criterion's own estimates.
//! `FLOTILLA_BENCH_QUICK=1` keeps only the 4 MiB size.
//!
//! Reading the ratio: all ranks share the machine's cores, so with n ranks the loopback
//! stack carries n streams at once (n · bus bandwidth in all), and every byte is also
//! encoded, summed and decoded; on a machine with fewer cores than ranks the ratio is
//! bounded near 1/n by CPU alone, not by the algorithm. The summary therefore also prints
//! n · bus bandwidth / stream throughput: the share of one stream's rate the whole group
//! sustains.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use flotilla_worker::comm::{Communicator, DataPlaneSecret, TcpCommunicator, TcpOptions, loopback_group};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

const MIB: usize = 1 << 20;

fn sizes() -> Vec<usize> {
    if std::env::var_os("FLOTILLA_BENCH_QUICK").is_some() { vec![4 * MIB] } else { vec![4 * MIB, 64 * MIB] }
}

fn label(bytes: usize) -> String {
    format!("{}MiB", bytes / MIB)
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime")
}

/// One all-reduce on every rank at once; the buffers travel into the tasks and back.
async fn all_reduce_once(comms: &[Arc<TcpCommunicator>], buffers: &mut [Vec<f32>]) {
    let handles: Vec<_> = comms
        .iter()
        .zip(buffers.iter_mut())
        .map(|(c, buf)| {
            let c = c.clone();
            let mut buf = std::mem::take(buf);
            tokio::spawn(async move {
                c.all_reduce_sum(&mut buf).await.expect("all-reduce");
                buf
            })
        })
        .collect();
    for (slot, h) in buffers.iter_mut().zip(handles) {
        *slot = h.await.expect("rank task");
    }
}

fn bench_all_reduce(c: &mut Criterion, rt: &Runtime) {
    let mut group = c.benchmark_group("comm");
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    for n in [2usize, 4] {
        let comms: Vec<Arc<TcpCommunicator>> = rt
            .block_on(loopback_group(n, TcpOptions::new(1, DataPlaneSecret::random())))
            .expect("loopback rendezvous")
            .into_iter()
            .map(Arc::new)
            .collect();
        for bytes in sizes() {
            // Zeros stay zeros however often they are summed: no overflow to infinities or
            // drift into subnormals across iterations (float adds cost the same otherwise).
            let mut buffers: Vec<Vec<f32>> = (0..n).map(|_| vec![0f32; bytes / 4]).collect();
            let bus_bytes = (2 * (n - 1) * bytes / n) as u64;
            group.throughput(Throughput::Bytes(bus_bytes));
            group.bench_function(BenchmarkId::new(format!("all_reduce/n{n}"), label(bytes)), |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            all_reduce_once(&comms, &mut buffers).await;
                        }
                        start.elapsed()
                    })
                })
            });
        }
    }
    group.finish();
}

/// A connected loopback pair with TCP_NODELAY, like the communicator's links.
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    let client = client.expect("connect");
    let (server, _) = accepted.expect("accept");
    client.set_nodelay(true).expect("nodelay");
    server.set_nodelay(true).expect("nodelay");
    (client, server)
}

fn bench_tcp_stream(c: &mut Criterion, rt: &Runtime) {
    let mut group = c.benchmark_group("comm");
    group.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    for bytes in sizes() {
        let (tx, mut rx) = rt.block_on(tcp_pair());
        // The writing end moves into a task each iteration and comes back.
        let mut tx = Some(tx);
        let payload = Arc::new(vec![1u8; bytes]);
        let mut sink = vec![0u8; MIB];
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(BenchmarkId::new("tcp_stream", label(bytes)), |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        // Writer on its own task, reader here: both ends run concurrently,
                        // as a link's writer and reader tasks do.
                        let payload = payload.clone();
                        let mut writer = tx.take().expect("the writing end is back");
                        let sent = tokio::spawn(async move {
                            writer.write_all(&payload).await.expect("write");
                            writer
                        });
                        let mut got = 0;
                        while got < bytes {
                            let n = rx.read(&mut sink).await.expect("read");
                            assert!(n > 0, "stream closed early");
                            got += n;
                        }
                        tx = Some(sent.await.expect("writer task"));
                    }
                    start.elapsed()
                })
            })
        });
    }
    group.finish();
}

/// Where criterion writes, resolved the way criterion itself does it, so the summary can
/// read back what was just measured.
fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        PathBuf::from(home)
    } else if let Some(target) = std::env::var_os("CARGO_TARGET_DIR") {
        PathBuf::from(target).join("criterion")
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target").join("criterion")
    }
}

/// (median seconds, bytes per iteration) for `comm/<id>`, from criterion's estimates.
fn median(dir: &Path, function: &str, size: &str) -> Option<(f64, f64)> {
    let case = dir.join("comm").join(function.replace('/', "_")).join(size).join("new");
    let read = |f: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(case.join(f)).ok()?).ok()
    };
    let median_ns = read("estimates.json")?["median"]["point_estimate"].as_f64()?;
    let bytes = read("benchmark.json")?["throughput"]["Bytes"].as_f64()?;
    Some((median_ns / 1e9, bytes))
}

fn summarize(dir: &Path) {
    println!("\ncomm summary (medians; GB/s = 1e9 B/s; all-reduce as bus bandwidth):");
    println!("{:<24} {:>12} {:>9} {:>12} {:>16}", "case", "median", "GB/s", "/ tcp_stream", "n·bus / tcp");
    for size in sizes().into_iter().map(label) {
        let reference = median(dir, "tcp_stream", &size);
        if let Some((t, b)) = reference {
            println!(
                "{:<24} {:>9.2} ms {:>9.2} {:>12} {:>16}",
                format!("tcp_stream/{size}"),
                t * 1e3,
                b / t / 1e9,
                "1.00",
                ""
            );
        }
        for n in [2, 4] {
            let function = format!("all_reduce/n{n}");
            if let Some((t, b)) = median(dir, &function, &size) {
                // The second ratio counts what the loopback stack carried for all n ranks
                // together (they share this machine), against the one stream.
                let (ratio, aggregate) = reference.map_or(("-".to_string(), "-".to_string()), |(rt, rb)| {
                    let r = (b / t) / (rb / rt);
                    (format!("{r:.2}"), format!("{:.2}", r * n as f64))
                });
                println!(
                    "{:<24} {:>9.2} ms {:>9.2} {:>12} {:>16}",
                    format!("{function}/{size}"),
                    t * 1e3,
                    b / t / 1e9,
                    ratio,
                    aggregate
                );
            }
        }
    }
}

fn main() {
    let dir = criterion_dir();
    let mut c = Criterion::default().output_directory(&dir).configure_from_args();
    let rt = runtime();
    bench_tcp_stream(&mut c, &rt);
    bench_all_reduce(&mut c, &rt);
    c.final_summary();
    summarize(&dir);
}
