//! `flotilla schedule`: compile, validate, simulate and draw a pipeline schedule, or compare
//! all four against the DeepSeek-V3 report's Table 2. The work is in
//! `flotilla_coordinator::schedule`; this parses flags and prints.

use anyhow::{Context, Result, bail};
use clap::{ArgGroup, Args};
use flotilla_coordinator::schedule::{
    self, Comparison, Costs, Outcome, PaperTable, Schedule, ScheduleKind, ScheduleSpec, Timeline, number,
};
use std::path::{Path, PathBuf};

/// The most (micro-batch, stage) chunks `--svg` draws: PP 16 with 4,096 micro-batches.
const MAX_DRAWN_CHUNKS: u64 = 1 << 16;

#[derive(Args)]
#[command(group = ArgGroup::new("output").required(true).multiple(false))]
pub struct ScheduleArgs {
    /// The schedule: dualpipe, dualpipev, 1f1b or zb1p (ignored by --table, which shows all).
    #[arg(long, default_value = "dualpipe")]
    kind: String,
    /// Pipeline stages. Every kind runs them on pp ranks, except DualPipeV: pp/2.
    #[arg(long)]
    pp: u32,
    /// Micro-batches per training step.
    #[arg(long)]
    micro_batches: u32,
    /// Simulated op costs F,B,W,FB: forward, full backward, its weight part, overlapped
    /// forward & backward [default: 1,2,1,3].
    #[arg(long, value_name = "F,B,W,FB")]
    costs: Option<String>,
    /// Simulated latency of one point-to-point transfer, in the units of --costs.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    latency: f64,
    /// Draw the simulated timeline as an SVG into FILE.
    #[arg(long, value_name = "FILE", group = "output")]
    svg: Option<PathBuf>,
    /// Print the instruction streams, the validator's report and the simulated times as JSON.
    #[arg(long, group = "output")]
    json: bool,
    /// Write the simulated timeline as a Chrome trace (Perfetto, chrome://tracing) to FILE;
    /// one cost unit is shown as 1 ms.
    #[arg(long, value_name = "FILE", group = "output")]
    chrome_trace: Option<PathBuf>,
    /// Compare all four schedules with the report's Table 2 formulas.
    #[arg(long, group = "output")]
    table: bool,
}

pub fn run(args: ScheduleArgs) -> Result<()> {
    let mut costs = match &args.costs {
        Some(text) => Costs::parse(text).context("--costs")?,
        None => Costs::default(),
    };
    costs.latency = args.latency;
    costs.check().context("--latency")?;

    let kind: ScheduleKind = args.kind.parse().context("--kind")?;
    if args.table {
        let rows = schedule::compare(args.pp, args.micro_batches, &costs);
        let errors: Vec<&str> = rows
            .iter()
            .filter_map(|r| match &r.outcome {
                Outcome::Error(message) => Some(message.as_str()),
                Outcome::Simulated(_) => None,
            })
            .collect();
        if errors.len() == rows.len() {
            bail!("--pp/--micro-batches: no schedule runs with these inputs: {}", errors.join("; "));
        }
        emit(&format_table(args.pp, args.micro_batches, &costs, &rows))?;
        return Ok(());
    }

    let spec = ScheduleSpec { kind, pp: args.pp, micro_batches: args.micro_batches };
    let chunks = u64::from(spec.pp) * u64::from(spec.micro_batches);
    if args.svg.is_some() && chunks > MAX_DRAWN_CHUNKS {
        bail!(
            "--svg: {chunks} chunks would not be readable as one picture (at most {MAX_DRAWN_CHUNKS}); \
             use --chrome-trace, which Perfetto zooms, or fewer stages or micro-batches"
        );
    }
    let compiled = schedule::compile(&spec).context("--kind/--pp/--micro-batches")?;
    let timeline = schedule::simulate(&compiled, &costs).context("simulating the compiled schedule")?;

    if args.json {
        emit(&format!(
            "{}\n",
            serde_json::to_string_pretty(&json_report(&spec, &costs, &compiled, &timeline))?
        ))?;
    } else if let Some(path) = &args.svg {
        write(path, &schedule::svg(&compiled, &timeline))?;
        println!("{}; wrote {}", summary(&compiled, &timeline), path.display());
    } else if let Some(path) = &args.chrome_trace {
        let trace = schedule::chrome_trace(&compiled, &timeline);
        write(path, &serde_json::to_string(&trace)?)?;
        println!("{}; wrote {}", summary(&compiled, &timeline), path.display());
    }
    Ok(())
}

/// Prints to stdout; a reader that closes the pipe early (`| head`) ends the output quietly,
/// as it does for other command-line tools, instead of panicking in `println!`.
fn emit(text: &str) -> Result<()> {
    use std::io::Write;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        result => result.context("writing to stdout"),
    }
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}

fn summary(schedule: &Schedule, timeline: &Timeline) -> String {
    format!(
        "{} pp {} on {} ranks, {} micro-batches: bubble {}, makespan {}, peak activations {}",
        schedule.kind,
        schedule.num_stages,
        schedule.num_ranks(),
        schedule.num_micro_batches,
        number(timeline.bubble),
        number(timeline.makespan),
        timeline.report.peak_activations.iter().copied().max().unwrap_or(0)
    )
}

fn json_report(
    spec: &ScheduleSpec,
    costs: &Costs,
    schedule: &Schedule,
    timeline: &Timeline,
) -> serde_json::Value {
    serde_json::json!({
        "spec": spec,
        "costs": costs,
        "schedule": schedule,
        // The simulator runs the validator's execution, so its report is the validator's.
        "report": timeline.report,
        "summary": {
            "ranks": schedule.num_ranks(),
            "makespan": timeline.makespan,
            "bubble": timeline.bubble,
            "busy": timeline.busy,
            "idle": timeline.idle,
            "peak_activations": timeline.report.peak_activations.iter().copied().max().unwrap_or(0),
            "paper": spec.kind.paper_figures(spec.pp, costs),
        },
    })
}

fn format_table(pp: u32, micro_batches: u32, costs: &Costs, rows: &[Comparison]) -> String {
    let header = [
        "schedule",
        "ranks",
        "bubble",
        "bubble (paper)",
        "makespan",
        "peak activations (paper)",
        "params per rank (paper)",
    ];
    let mut cells: Vec<[String; 7]> = Vec::new();
    let mut errors = Vec::new();
    for row in rows {
        let paper = &row.paper;
        let (bubble, makespan, activations, params) = match &row.outcome {
            Outcome::Simulated(s) => (
                number(s.bubble),
                number(s.makespan),
                s.peak_activations.to_string(),
                s.parameter_copies.to_string(),
            ),
            Outcome::Error(message) => {
                errors.push(format!("{}: {message}", row.kind));
                ("n/a".into(), "n/a".into(), "n/a".into(), "n/a".into())
            }
        };
        cells.push([
            row.kind.to_string(),
            row.ranks.to_string(),
            bubble,
            number(paper.bubble),
            makespan,
            format!("{activations} ({})", paper.activations),
            format!("{params} ({}×)", paper.parameter_copies),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            cells.iter().map(|r| r[c].chars().count()).chain([header[c].chars().count()]).max().unwrap_or(0)
        })
        .collect();
    let line = |row: &[&str]| {
        let mut out = String::new();
        for (c, (cell, width)) in row.iter().zip(&widths).enumerate() {
            // Names read left to right; numbers line up on the right.
            let padded = if c == 0 { format!("{cell:<width$}") } else { format!("{cell:>width$}") };
            out.push_str(&padded);
            out.push_str(if c + 1 < row.len() { "  " } else { "\n" });
        }
        out
    };

    let mut out = format!(
        "pipeline schedules for pp = {pp} stages, {micro_batches} micro-batches, costs {}\n\n",
        costs
    );
    out.push_str(&line(&header));
    for row in &cells {
        out.push_str(&line(&row.each_ref().map(String::as_str)));
    }
    out.push('\n');
    for error in &errors {
        out.push_str(&format!("{error}\n"));
    }
    if !errors.is_empty() {
        out.push('\n');
    }
    let exact = costs.matches_table_2();
    out.push_str(&format!(
        "bubble: the most idle time of any rank, simulated; (paper): Table 2 of the DeepSeek-V3 report.\n\
         DualPipe's formula is exact when F = B−W, W ≤ F, B ≤ F&B ≤ F+B and latency is 0 ({}); otherwise\n\
         the simulated bubble is the one of the actual op order and the formula an estimate.\n\
         Activations in micro-batch × stage units, parameters in stages' worth.\n",
        if exact { "true for these costs" } else { "not the case for these costs" }
    ));
    out
}
