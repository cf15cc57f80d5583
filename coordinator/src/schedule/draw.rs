//! Pictures and tables of simulated schedules, for people: an SVG in the style of the
//! DualPipe figure of the DeepSeek-V3 report, a Chrome trace to browse in Perfetto, and the
//! side-by-side comparison of the four schedules against the report's Table 2.
//!
//! Everything here reads a [`Schedule`] and its [`Timeline`]; nothing changes them, so a
//! picture shows exactly the op order the workers would run.

use super::{
    Chunk, Costs, Instruction, PaperFigures, PaperTable, Schedule, ScheduleKind, ScheduleSpec, Span,
    Timeline, compile, simulate,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// The width of the SVG: wide enough for 64 micro-batches on 16 ranks on one screen.
const WIDTH: f64 = 1600.0;
/// Room left of the time axis for "rank r" and its stages.
const LEFT: f64 = 150.0;
const RIGHT: f64 = 24.0;
/// Below the title, above the first row: the time axis's labels.
const TOP: f64 = 84.0;
/// Below this a micro-batch number is unreadable, so it is left out (the box's tooltip
/// still names it).
const MIN_FONT: f64 = 6.0;
/// Average advance of a digit in a sans-serif font, in ems; enough to decide whether a
/// number fits in a box.
const DIGIT_EM: f64 = 0.62;

/// How a compute box is colored: what it computes, independent of the micro-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Part {
    Forward,
    BackwardInput,
    Backward,
    Weight,
}

impl Part {
    const ALL: [Part; 4] = [Part::Forward, Part::BackwardInput, Part::Backward, Part::Weight];

    fn label(self) -> &'static str {
        match self {
            Part::Forward => "F forward",
            Part::BackwardInput => "B backward for input",
            Part::Backward => "BW full backward",
            Part::Weight => "W backward for weights",
        }
    }

    /// Direction 0 in the report's figure colors (orange forward, blue backward, green W);
    /// direction 1 in a second family (rose, purple, teal) so the two streams of DualPipe
    /// micro-batches stay apart where they cross.
    pub(super) fn color(self, direction: u32) -> &'static str {
        match (direction, self) {
            (0, Part::Forward) => "#f5a142",
            (0, Part::BackwardInput) => "#7fb3e6",
            (0, Part::Backward) => "#3d78c4",
            (0, Part::Weight) => "#7cc47a",
            (_, Part::Forward) => "#e8707e",
            (_, Part::BackwardInput) => "#c39bd3",
            (_, Part::Backward) => "#8a55b0",
            (_, Part::Weight) => "#3fb5a8",
        }
    }

    /// The Chrome trace viewer's nearest named color (`cname` takes only the names of
    /// catapult's palette) to [`Part::color`]: orange, light blue, blue, green for
    /// direction 0; rose, mauve, purple, teal for direction 1.
    pub(super) fn cname(self, direction: u32) -> &'static str {
        match (direction, self) {
            (0, Part::Forward) => "rail_idle",
            (0, Part::BackwardInput) => "thread_state_runnable",
            (0, Part::Backward) => "rail_response",
            (0, Part::Weight) => "thread_state_running",
            (_, Part::Forward) => "cq_build_failed",
            (_, Part::BackwardInput) => "thread_state_uninterruptible",
            (_, Part::Backward) => "detailed_memory_dump",
            (_, Part::Weight) => "background_memory_dump",
        }
    }
}

/// A compute instruction's colored parts: one, or two halves for an overlapped F&B.
pub(super) fn parts(instruction: &Instruction) -> Option<Vec<(Part, Chunk)>> {
    Some(match *instruction {
        Instruction::Forward { chunk } => vec![(Part::Forward, chunk)],
        Instruction::BackwardInput { chunk } => vec![(Part::BackwardInput, chunk)],
        Instruction::Backward { chunk } => vec![(Part::Backward, chunk)],
        Instruction::BackwardWeight { chunk } => vec![(Part::Weight, chunk)],
        Instruction::OverlappedForwardBackward { forward, backward } => {
            vec![(Part::Forward, forward), (Part::Backward, backward)]
        }
        _ => return None,
    })
}

/// Escapes text for SVG element content and attribute values alike.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// A time or cost for people: at most three decimals, no trailing zeros, so that the
/// simulator's sums (5.999999…) print as the 6 they are.
pub fn number(value: f64) -> String {
    let text = format!("{value:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text == "-0" { "0".to_string() } else { text.to_string() }
}

/// More than the ~16 ticks a 1-2-5 step gives, so the cap never cuts a normal axis.
const MAX_TICKS: u32 = 40;

/// A 1-2-5 step that cuts `span` into about `ticks` intervals.
fn tick_step(span: f64, ticks: f64) -> f64 {
    let raw = span / ticks;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * magnitude).find(|s| *s >= raw);
    step.unwrap_or(10.0 * magnitude)
}

/// Black or white, whichever reads better on `fill` (a `#rrggbb` color).
fn text_color(fill: &str) -> &'static str {
    let channel = |i: usize| u8::from_str_radix(fill.get(i..i + 2).unwrap_or("ff"), 16).unwrap_or(255) as f64;
    let luma = 0.299 * channel(1) + 0.587 * channel(3) + 0.114 * channel(5);
    if luma > 140.0 { "#111" } else { "#fff" }
}

/// "stages 3, 12" for rank labels.
fn stage_list(stages: &[u32]) -> String {
    let list: Vec<String> = stages.iter().map(|s| s.to_string()).collect();
    match stages.len() {
        1 => format!("stage {}", list[0]),
        _ => format!("stages {}", list.join(", ")),
    }
}

/// Draws `timeline` (the simulation of `schedule`) as a self-contained SVG: one row per
/// rank, one box per compute instruction at its simulated start and end, colored by what
/// it computes and by the direction its micro-batch travels ([`Schedule::direction`]),
/// the micro-batch number inside when it fits. An overlapped F&B is one box split in two
/// halves, forward then backward, with a dark outline. Idle time is empty background.
///
/// The title names the schedule, the costs it was simulated under, the makespan, the
/// bubble and the peak activations.
///
/// Each compute instruction is exactly one `<rect class="op" …>` carrying `data-rank`,
/// `data-index` (its position in the rank's stream) and `data-op` (its label), and a
/// tooltip naming the instruction and its times.
pub fn svg(schedule: &Schedule, timeline: &Timeline) -> String {
    let frame = Frame::new(schedule, timeline);
    let legend = Legend::lay_out(legend_entries(schedule, &frame.compute), frame.rows_bottom + 36.0);
    // `write!` into a String cannot fail, so its Result is dropped throughout.
    let mut out = String::new();
    write_header(&mut out, schedule, timeline, legend.height);
    write_axis(&mut out, &frame);
    write_rank_rows(&mut out, schedule, timeline, &frame);
    write_ops(&mut out, schedule, &frame);
    write_legend(&mut out, &legend);
    out.push_str("</svg>\n");
    out
}

/// The picture's geometry: rows, the time scale and the font of the numbers in the boxes.
struct Frame<'a> {
    row: f64,
    box_height: f64,
    scale: f64,
    makespan: f64,
    rows_bottom: f64,
    font: f64,
    /// The compute instructions' spans: the boxes.
    compute: Vec<&'a Span>,
}

impl<'a> Frame<'a> {
    fn new(schedule: &Schedule, timeline: &'a Timeline) -> Self {
        let ranks = schedule.num_ranks().max(1) as usize;
        let row = (640.0 / ranks as f64).clamp(22.0, 44.0);
        let box_height = row - 6.0;
        let plot = WIDTH - LEFT - RIGHT;
        let makespan = timeline.makespan;
        let scale = if makespan > 0.0 { plot / makespan } else { 0.0 };
        let compute: Vec<&Span> = timeline.spans.iter().filter(|s| s.instruction.is_compute()).collect();
        // One font for every number, sized for the narrowest box, so rows read evenly; a
        // box narrower still goes without its number.
        let digits = schedule.num_micro_batches.saturating_sub(1).max(1).to_string().len() as f64;
        let narrowest = compute
            .iter()
            .filter(|s| s.end > s.start)
            .map(|s| {
                let halves = parts(&s.instruction).map_or(1, |p| p.len()) as f64;
                (s.end - s.start) * scale / halves
            })
            .fold(f64::INFINITY, f64::min);
        let font = (box_height * 0.55).min(12.0).min((narrowest - 2.0) / (digits * DIGIT_EM)).max(MIN_FONT);
        Frame { row, box_height, scale, makespan, rows_bottom: TOP + row * ranks as f64, font, compute }
    }

    /// The x coordinate of time `t`.
    fn x_of(&self, t: f64) -> f64 {
        LEFT + t * self.scale
    }

    /// Whether `text` fits in a box `width` wide at the numbers' font.
    fn fits(&self, width: f64, text: &str) -> bool {
        text.len() as f64 * DIGIT_EM * self.font + 2.0 <= width
    }
}

/// The legend's entries, in a fixed order: the parts and directions the picture uses, and
/// the overlapped F&B box if there is one. Each is its swatch's colors and its label.
fn legend_entries(schedule: &Schedule, compute: &[&Span]) -> Vec<(Vec<&'static str>, String)> {
    let mut used: BTreeSet<(u32, Part)> = BTreeSet::new();
    let mut overlapped = false;
    for span in compute {
        if let Some(p) = parts(&span.instruction) {
            overlapped |= p.len() == 2;
            for (part, chunk) in p {
                used.insert((schedule.direction(chunk.micro_batch), part));
            }
        }
    }
    let two_directions = used.iter().any(|(d, _)| *d != 0);
    let mut legend: Vec<(Vec<&'static str>, String)> = Vec::new();
    for direction in [0, 1] {
        for part in Part::ALL {
            if used.contains(&(direction, part)) {
                let label = if two_directions {
                    let from = if direction == 0 { "enters at rank 0" } else { "enters at the last rank" };
                    format!("{} (direction {direction}, {from})", part.label())
                } else {
                    part.label().to_string()
                };
                legend.push((vec![part.color(direction)], label));
            }
        }
    }
    if overlapped {
        legend.push((
            vec![Part::Forward.color(0), Part::Backward.color(u32::from(two_directions))],
            "F&B overlapped forward | backward (outlined)".to_string(),
        ));
    }
    legend
}

/// The legend laid out in lines that fit the width.
struct Legend {
    /// Each entry at its place: x, y (the text's baseline), swatch colors, label.
    items: Vec<(f64, f64, Vec<&'static str>, String)>,
    /// The whole picture's height: the legend is at the bottom.
    height: f64,
}

impl Legend {
    fn lay_out(entries: Vec<(Vec<&'static str>, String)>, top: f64) -> Self {
        let mut items = Vec::new();
        let (mut x, mut y) = (LEFT, top);
        for (colors, label) in entries {
            let width = 24.0 + label.chars().count() as f64 * 6.6 + 24.0;
            if x + width > WIDTH - RIGHT && x > LEFT {
                x = LEFT;
                y += 22.0;
            }
            items.push((x, y, colors, label));
            x += width;
        }
        Legend { items, height: y + 30.0 }
    }
}

/// The `<svg>` element's start, the title and the subtitle.
fn write_header(out: &mut String, schedule: &Schedule, timeline: &Timeline, height: f64) {
    let title = format!(
        "{} · pp {} ({} ranks) · {} micro-batches",
        schedule.kind,
        schedule.num_stages,
        schedule.num_ranks(),
        schedule.num_micro_batches
    );
    let subtitle = format!(
        "costs {} · makespan {} · bubble {} (most idle time of any rank) · peak activations {}",
        timeline.costs.as_ref().map_or_else(|| "per instruction".to_string(), Costs::to_string),
        number(timeline.makespan),
        number(timeline.bubble),
        timeline.report.peak_activations.iter().copied().max().unwrap_or(0)
    );
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="Helvetica, Arial, sans-serif">"#,
        w = WIDTH,
        h = number(height)
    );
    let _ = writeln!(out, "<title>{}</title>", escape(&title));
    let _ = writeln!(
        out,
        r##"<rect class="background" x="0" y="0" width="100%" height="100%" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        out,
        r##"<text x="{LEFT}" y="24" font-size="17" font-weight="bold" fill="#111">{}</text>"##,
        escape(&title)
    );
    let _ =
        writeln!(out, r##"<text x="{LEFT}" y="44" font-size="12" fill="#333">{}</text>"##, escape(&subtitle));
}

/// The time axis: grid lines through the rows, labels above and below.
fn write_axis(out: &mut String, frame: &Frame) {
    let makespan = frame.makespan;
    let _ = writeln!(out, r##"<g class="axis" font-size="10" fill="#555" text-anchor="middle">"##);
    let _ = writeln!(out, r#"<text x="{}" y="{}" text-anchor="end">time</text>"#, LEFT - 8.0, TOP - 10.0);
    if makespan > 0.0 && makespan.is_finite() {
        let step = tick_step(makespan, 16.0);
        // A subnormal makespan gives a zero step; the cap keeps the axis finite regardless.
        let ticks = if step.is_normal() { MAX_TICKS } else { 0 };
        for k in 0..=ticks {
            let t = f64::from(k) * step;
            if t > makespan * (1.0 + 1e-9) {
                break;
            }
            let x = number(frame.x_of(t));
            let _ = writeln!(
                out,
                r##"<line x1="{x}" y1="{}" x2="{x}" y2="{}" stroke="#e4e4e4"/><text x="{x}" y="{}">{}</text><text x="{x}" y="{}">{}</text>"##,
                TOP - 4.0,
                number(frame.rows_bottom),
                TOP - 10.0,
                number(t),
                number(frame.rows_bottom + 14.0),
                number(t)
            );
        }
    }
    let _ = writeln!(out, "</g>");
}

/// Rank rows: label, stages, a baseline so idle gaps read as gaps.
fn write_rank_rows(out: &mut String, schedule: &Schedule, timeline: &Timeline, frame: &Frame) {
    let row = frame.row;
    let _ = writeln!(out, r#"<g class="ranks">"#);
    for rank in 0..schedule.num_ranks() as usize {
        let y = TOP + row * rank as f64;
        let stages = timeline.report.stages.get(rank).map(|s| stage_list(s)).unwrap_or_default();
        let _ = writeln!(
            out,
            r##"<text x="10" y="{}" font-size="12" font-weight="bold" fill="#111">rank {rank}</text><text x="10" y="{}" font-size="10" fill="#555">{}</text><line x1="{LEFT}" y1="{}" x2="{}" y2="{}" stroke="#cccccc"/>"##,
            number(y + row * 0.45),
            number(y + row * 0.45 + 12.0),
            escape(&stages),
            number(y + row - 3.0),
            number(frame.x_of(frame.makespan)),
            number(y + row - 3.0)
        );
    }
    let _ = writeln!(out, "</g>");
}

/// One box per compute instruction: split in halves when overlapped, each with its
/// micro-batch number where it fits.
fn write_ops(out: &mut String, schedule: &Schedule, frame: &Frame) {
    let box_height = frame.box_height;
    let _ = writeln!(out, r#"<g class="ops" font-size="{}" text-anchor="middle">"#, number(frame.font));
    for span in &frame.compute {
        let Some(p) = parts(&span.instruction) else { continue };
        let y = TOP + frame.row * span.rank as f64 + 1.0;
        let x0 = frame.x_of(span.start);
        let width = (span.end - span.start) * frame.scale;
        let tooltip = format!(
            "rank {}, #{}: {} [{} – {}]",
            span.rank,
            span.index,
            span.instruction,
            number(span.start),
            number(span.end)
        );
        let (first, chunk) = p[0];
        let fill = first.color(schedule.direction(chunk.micro_batch));
        let _ = write!(
            out,
            r##"<g><title>{}</title><rect class="op" data-rank="{}" data-index="{}" data-op="{}" x="{}" y="{}" width="{}" height="{}" fill="{fill}" stroke="#ffffff" stroke-width="0.5"/>"##,
            escape(&tooltip),
            span.rank,
            span.index,
            escape(span.instruction.label()),
            number(x0),
            number(y),
            number(width),
            number(box_height)
        );
        let half = width / p.len() as f64;
        for (i, (part, chunk)) in p.iter().enumerate() {
            let hx = x0 + half * i as f64;
            let color = part.color(schedule.direction(chunk.micro_batch));
            if i > 0 {
                let _ = write!(
                    out,
                    r#"<rect class="op-half" x="{}" y="{}" width="{}" height="{}" fill="{color}"/>"#,
                    number(hx),
                    number(y),
                    number(half),
                    number(box_height)
                );
            }
            let text = chunk.micro_batch.to_string();
            if frame.fits(half, &text) {
                let _ = write!(
                    out,
                    r#"<text x="{}" y="{}" dominant-baseline="central" fill="{}">{text}</text>"#,
                    number(hx + half / 2.0),
                    number(y + box_height / 2.0),
                    text_color(color)
                );
            }
        }
        if p.len() > 1 {
            let _ = write!(
                out,
                r##"<rect class="op-outline" x="{}" y="{}" width="{}" height="{}" fill="none" stroke="#222" stroke-width="1.2"/>"##,
                number(x0),
                number(y),
                number(width),
                number(box_height)
            );
        }
        let _ = writeln!(out, "</g>");
    }
    let _ = writeln!(out, "</g>");
}

/// The legend's swatches and labels.
fn write_legend(out: &mut String, legend: &Legend) {
    let _ = writeln!(out, r##"<g class="legend" font-size="11" fill="#222">"##);
    for (x, y, colors, label) in &legend.items {
        let swatch = 16.0 / colors.len() as f64;
        for (i, color) in colors.iter().enumerate() {
            let _ = write!(
                out,
                r#"<rect class="swatch" x="{}" y="{}" width="{}" height="12" fill="{color}"/>"#,
                number(x + swatch * i as f64),
                number(y - 10.0),
                number(swatch)
            );
        }
        let _ =
            writeln!(out, r#"<text x="{}" y="{}">{}</text>"#, number(x + 22.0), number(*y), escape(label));
    }
    let _ = writeln!(out, "</g>");
}

/// One Chrome trace event for a chunk's place in the pipeline.
fn chunk_args(schedule: &Schedule, chunk: Chunk) -> Value {
    json!({
        "micro_batch": chunk.micro_batch,
        "stage": chunk.stage,
        "direction": schedule.direction(chunk.micro_batch),
    })
}

/// `timeline` as a Chrome trace (the JSON object format), to open in Perfetto
/// (ui.perfetto.dev) or `chrome://tracing`.
///
/// One cost unit is shown as one millisecond: `ts` and `dur` are the simulated times × 1000
/// (the format counts microseconds). Each rank is a thread (`tid` = rank) named
/// "rank r (stages a, b)"; each compute instruction is one complete event (`"ph": "X"`)
/// named like "F mb 3 stage 1" with its kind label as `cat`, the micro-batch, stage and
/// direction in `args` (an F&B names both chunks and carries `forward` and `backward`), and
/// as `cname` the trace viewer's named color nearest to the SVG's fill for its kind and
/// direction (an F&B takes its forward half's; `chrome://tracing` honours `cname`, Perfetto
/// colors by name).
/// Time a rank spends blocked in a receive is a "recv wait" event with `cat` "wait".
pub fn chrome_trace(schedule: &Schedule, timeline: &Timeline) -> Value {
    const MICROS: f64 = 1000.0;
    let mut events = Vec::new();
    events.push(json!({
        "ph": "M", "pid": 0, "tid": 0, "name": "process_name",
        "args": { "name": format!("{} pp {} · {} micro-batches", schedule.kind, schedule.num_stages, schedule.num_micro_batches) },
    }));
    for rank in 0..schedule.num_ranks() {
        let stages = timeline.report.stages.get(rank as usize).map(|s| s.as_slice()).unwrap_or_default();
        let list: Vec<String> = stages.iter().map(|s| s.to_string()).collect();
        let name = match list.len() {
            0 => format!("rank {rank}"),
            1 => format!("rank {rank} (stage {})", list[0]),
            _ => format!("rank {rank} (stages {})", list.join(", ")),
        };
        events.push(
            json!({ "ph": "M", "pid": 0, "tid": rank, "name": "thread_name", "args": { "name": name } }),
        );
        events.push(json!({ "ph": "M", "pid": 0, "tid": rank, "name": "thread_sort_index", "args": { "sort_index": rank } }));
    }
    for span in &timeline.spans {
        let ts = span.start * MICROS;
        let dur = (span.end - span.start) * MICROS;
        let event = match span.instruction {
            Instruction::Forward { chunk }
            | Instruction::BackwardInput { chunk }
            | Instruction::BackwardWeight { chunk }
            | Instruction::Backward { chunk } => json!({
                "name": format!("{} mb {} stage {}", span.instruction.label(), chunk.micro_batch, chunk.stage),
                "cat": span.instruction.label(),
                "cname": parts(&span.instruction)
                    .map_or(Part::Forward, |p| p[0].0)
                    .cname(schedule.direction(chunk.micro_batch)),
                "args": chunk_args(schedule, chunk),
            }),
            Instruction::OverlappedForwardBackward { forward, backward } => json!({
                "name": format!(
                    "F&B mb {} stage {} & mb {} stage {}",
                    forward.micro_batch, forward.stage, backward.micro_batch, backward.stage
                ),
                "cat": span.instruction.label(),
                "cname": Part::Forward.cname(schedule.direction(forward.micro_batch)),
                "args": { "forward": chunk_args(schedule, forward), "backward": chunk_args(schedule, backward) },
            }),
            Instruction::RecvActivation { chunk, peer } | Instruction::RecvGrad { chunk, peer }
                if dur > 0.0 =>
            {
                json!({
                    "name": "recv wait",
                    "cat": "wait",
                    "args": {
                        "waits_for": span.instruction.to_string(),
                        "peer": peer,
                        "micro_batch": chunk.micro_batch,
                        "stage": chunk.stage,
                        "direction": schedule.direction(chunk.micro_batch),
                    },
                })
            }
            _ => continue,
        };
        let Value::Object(mut event) = event else { continue };
        event.insert("ph".into(), json!("X"));
        event.insert("pid".into(), json!(0));
        event.insert("tid".into(), json!(span.rank));
        event.insert("ts".into(), json!(ts));
        event.insert("dur".into(), json!(dur));
        events.push(Value::Object(event));
    }
    json!({
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {
            "schedule": schedule.kind.name(),
            "pp": schedule.num_stages,
            "ranks": schedule.num_ranks(),
            "micro_batches": schedule.num_micro_batches,
            "time_unit": "one cost unit = 1 ms",
            "makespan": timeline.makespan,
            "bubble": timeline.bubble,
        },
    })
}

/// What compiling and simulating one schedule measured.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Simulated {
    /// The simulated bubble: the most idle time of any rank.
    pub bubble: f64,
    /// When the last rank finishes.
    pub makespan: f64,
    /// Peak activations of the fullest rank, in micro-batch × stage units.
    pub peak_activations: u32,
    /// Parameters of the rank that hosts the most, in stages' worth.
    pub parameter_copies: u32,
}

/// A schedule's simulation, or why it does not exist for the inputs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It compiled and ran.
    Simulated(Simulated),
    /// The compiler or simulator refused the inputs; the message says what is allowed.
    Error(String),
}

/// One row of [`compare`]: a schedule's simulation beside the report's Table 2 formulas.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The schedule.
    pub kind: ScheduleKind,
    /// Pipeline ranks it runs on ([`ScheduleKind::ranks_for`]).
    pub ranks: u32,
    /// What the report's formulas predict.
    pub paper: PaperFigures,
    /// What the simulator measured, or the error.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Compiles and simulates every [`ScheduleKind::ALL`] for `pp` stages and `micro_batches`
/// under `costs`, beside the report's formulas. A kind that cannot run for these inputs
/// (DualPipe needs an even number of micro-batches ≥ 2·pp, for example) gets an
/// [`Outcome::Error`] row; the others are still compared.
pub fn compare(pp: u32, micro_batches: u32, costs: &Costs) -> Vec<Comparison> {
    ScheduleKind::ALL
        .into_iter()
        .map(|kind| {
            let spec = ScheduleSpec { kind, pp, micro_batches };
            let outcome = match compile(&spec).and_then(|schedule| simulate(&schedule, costs)) {
                Ok(timeline) => Outcome::Simulated(Simulated {
                    bubble: timeline.bubble,
                    makespan: timeline.makespan,
                    peak_activations: timeline.report.peak_activations.iter().copied().max().unwrap_or(0),
                    parameter_copies: timeline.report.parameter_copies().into_iter().max().unwrap_or(0),
                }),
                Err(e) => Outcome::Error(e.to_string()),
            };
            Comparison { kind, ranks: kind.ranks_for(pp), paper: kind.paper_figures(pp, costs), outcome }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(kind: ScheduleKind, pp: u32, micro_batches: u32, costs: &Costs) -> (Schedule, Timeline) {
        let schedule = compile(&ScheduleSpec { kind, pp, micro_batches }).expect("compiles");
        let timeline = simulate(&schedule, costs).expect("simulates");
        (schedule, timeline)
    }

    fn compute_count(schedule: &Schedule) -> usize {
        schedule.ranks.iter().flatten().filter(|i| i.is_compute()).count()
    }

    /// Every `&` starts an entity and no `<` or `>` appears inside text content: what an
    /// XML parser would reject if an escape were missing.
    fn assert_escaped(svg: &str) {
        for (at, _) in svg.match_indices('&') {
            let rest = &svg[at..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"].iter().any(|e| rest.starts_with(e)),
                "bare & at {at}: {}",
                &rest[..rest.len().min(30)]
            );
        }
        for (at, _) in svg.match_indices("<text") {
            let close = svg[at..].find("</text>").expect("closed text") + at;
            let content_start = svg[at..close].find('>').expect("tag end") + at + 1;
            let content = &svg[content_start..close];
            assert!(!content.contains('<') && !content.contains('>'), "unescaped text {content:?}");
        }
        for (at, _) in svg.match_indices("<title>") {
            let close = svg[at..].find("</title>").expect("closed title") + at;
            let content = &svg[at + "<title>".len()..close];
            assert!(!content.contains('<') && !content.contains('>'), "unescaped title {content:?}");
        }
    }

    #[test]
    fn svg_draws_one_box_per_compute_instruction_with_numbers() {
        for kind in ScheduleKind::ALL {
            let (schedule, timeline) = run(kind, 4, 8, &Costs::default());
            let svg = svg(&schedule, &timeline);
            assert!(svg.starts_with("<svg"), "{kind}");
            assert!(svg.trim_end().ends_with("</svg>"), "{kind}");
            assert_eq!(svg.matches(r#"<rect class="op""#).count(), compute_count(&schedule), "{kind}");
            for micro_batch in 0..8 {
                assert!(
                    svg.contains(&format!(">{micro_batch}</text>")),
                    "{kind}: no box shows mb {micro_batch}"
                );
            }
            for rank in 0..schedule.num_ranks() {
                assert!(svg.contains(&format!(">rank {rank}</text>")), "{kind}: no label for rank {rank}");
            }
            assert_eq!(svg.matches("<g").count(), svg.matches("</g>").count(), "{kind}: unbalanced groups");
            assert_escaped(&svg);
        }
    }

    #[test]
    fn svg_splits_overlapped_boxes_and_colors_both_directions() {
        let (schedule, timeline) = run(ScheduleKind::DualPipe, 4, 8, &Costs::default());
        let svg = svg(&schedule, &timeline);
        let overlapped = schedule
            .ranks
            .iter()
            .flatten()
            .filter(|i| matches!(i, Instruction::OverlappedForwardBackward { .. }))
            .count();
        assert!(overlapped > 0);
        assert_eq!(svg.matches(r#"<rect class="op-half""#).count(), overlapped);
        assert_eq!(svg.matches(r#"data-op="F&amp;B""#).count(), overlapped);
        assert!(svg.contains(Part::Forward.color(0)) && svg.contains(Part::Forward.color(1)));
        assert!(svg.contains("direction 1"), "the legend tells the directions apart");
        assert_escaped(&svg);
    }

    #[test]
    fn svg_stays_within_its_width_at_pp_16_with_64_micro_batches() {
        let (schedule, timeline) = run(ScheduleKind::DualPipe, 16, 64, &Costs::default());
        let svg = svg(&schedule, &timeline);
        assert_eq!(svg.matches(r#"<rect class="op""#).count(), compute_count(&schedule));
        for (at, _) in svg.match_indices(r#"<rect class="op""#) {
            let tag = &svg[at..at + svg[at..].find("/>").unwrap()];
            let attr = |name: &str| -> f64 {
                let start = tag.find(&format!(" {name}=\"")).unwrap() + name.len() + 3;
                tag[start..start + tag[start..].find('"').unwrap()].parse().unwrap()
            };
            assert!(attr("x") >= LEFT - 1e-6 && attr("x") + attr("width") <= WIDTH - RIGHT + 0.01, "{tag}");
        }
        assert_escaped(&svg);
    }

    #[test]
    fn svg_of_a_zero_cost_timeline_is_still_well_formed() {
        let zero = Costs { forward: 0.0, backward: 0.0, weight: 0.0, overlapped: 0.0, latency: 0.0 };
        let (schedule, timeline) = run(ScheduleKind::OneFOneB, 2, 2, &zero);
        let svg = svg(&schedule, &timeline);
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        assert_eq!(svg.matches(r#"<rect class="op""#).count(), compute_count(&schedule));
    }

    #[test]
    fn chrome_trace_has_one_complete_event_per_compute_instruction() {
        let costs = Costs { latency: 0.25, ..Costs::default() };
        for kind in ScheduleKind::ALL {
            let (schedule, timeline) = run(kind, 4, 8, &costs);
            let trace = chrome_trace(&schedule, &timeline);
            assert_eq!(trace["displayTimeUnit"], "ms");
            let events = trace["traceEvents"].as_array().unwrap();
            let compute: Vec<&Value> =
                events.iter().filter(|e| e["ph"] == "X" && e["cat"] != "wait").collect();
            assert_eq!(compute.len(), compute_count(&schedule), "{kind}");
            let spans: Vec<&Span> = timeline.spans.iter().filter(|s| s.instruction.is_compute()).collect();
            for (event, span) in compute.iter().zip(&spans) {
                assert_eq!(event["tid"], span.rank);
                assert_eq!(event["dur"].as_f64().unwrap(), (span.end - span.start) * 1000.0);
                assert_eq!(event["ts"].as_f64().unwrap(), span.start * 1000.0);
                assert_eq!(event["cat"], span.instruction.label());
            }
            let tids: BTreeSet<u64> = compute.iter().map(|e| e["tid"].as_u64().unwrap()).collect();
            assert_eq!(tids, (0..u64::from(schedule.num_ranks())).collect(), "{kind}");
            let names: Vec<&Value> = events.iter().filter(|e| e["name"] == "thread_name").collect();
            assert_eq!(names.len(), schedule.num_ranks() as usize);
            assert!(names[0]["args"]["name"].as_str().unwrap().starts_with("rank 0 (stage"));
            for wait in events.iter().filter(|e| e["cat"] == "wait") {
                assert!(wait["dur"].as_f64().unwrap() > 0.0);
            }
        }
    }

    #[test]
    fn chrome_trace_names_chunks_and_directions() {
        let (schedule, timeline) = run(ScheduleKind::DualPipe, 4, 8, &Costs::default());
        let trace = chrome_trace(&schedule, &timeline);
        let events = trace["traceEvents"].as_array().unwrap();
        assert!(events.iter().any(|e| e["name"] == "F mb 0 stage 0" && e["args"]["direction"] == 0));
        assert!(events.iter().any(|e| e["name"] == "F mb 4 stage 0" && e["args"]["direction"] == 1));
        let fb = events.iter().find(|e| e["cat"] == "F&B").expect("an overlapped event");
        assert!(fb["args"]["forward"]["micro_batch"].is_u64() && fb["args"]["backward"]["stage"].is_u64());
        assert!(trace["traceEvents"].as_array().unwrap().iter().all(|e| e["pid"] == 0));
    }

    #[test]
    fn compare_orders_the_bubbles_as_the_report_does() {
        let rows = compare(8, 20, &Costs::default());
        assert_eq!(rows.iter().map(|r| r.kind).collect::<Vec<_>>(), ScheduleKind::ALL);
        let bubble = |kind: ScheduleKind| match &rows.iter().find(|r| r.kind == kind).unwrap().outcome {
            Outcome::Simulated(s) => s.bubble,
            Outcome::Error(e) => panic!("{kind}: {e}"),
        };
        assert!(bubble(ScheduleKind::DualPipe) < bubble(ScheduleKind::Zb1p));
        assert!(bubble(ScheduleKind::Zb1p) < bubble(ScheduleKind::OneFOneB));
        for row in &rows {
            let Outcome::Simulated(s) = &row.outcome else { panic!("{}", row.kind) };
            assert_eq!(s.parameter_copies, row.paper.parameter_copies, "{}", row.kind);
        }
        // Default costs have F = B − W = W, where the formulas are exact.
        for row in &rows {
            let Outcome::Simulated(s) = &row.outcome else { unreachable!() };
            assert!(
                (s.bubble - row.paper.bubble).abs() < 1e-9,
                "{}: {} vs {}",
                row.kind,
                s.bubble,
                row.paper.bubble
            );
        }
    }

    #[test]
    fn compare_reports_kinds_that_cannot_run_without_failing_the_rest() {
        let rows = compare(8, 10, &Costs::default());
        let dualpipe = rows.iter().find(|r| r.kind == ScheduleKind::DualPipe).unwrap();
        let Outcome::Error(message) = &dualpipe.outcome else { panic!("dualpipe ran with 10 micro-batches") };
        assert!(message.contains("2·pp"), "{message}");
        let one_f_one_b = rows.iter().find(|r| r.kind == ScheduleKind::OneFOneB).unwrap();
        assert!(matches!(one_f_one_b.outcome, Outcome::Simulated(_)));
        assert_eq!(rows.iter().find(|r| r.kind == ScheduleKind::DualPipeV).unwrap().ranks, 4);

        let json = serde_json::to_value(&rows).unwrap();
        assert!(json[2]["error"].is_string());
        assert!(json[0]["simulated"]["bubble"].is_number());
        let back: Vec<Comparison> = serde_json::from_value(json).unwrap();
        assert_eq!(back, rows);
    }

    #[test]
    fn numbers_print_without_float_noise() {
        assert_eq!(number(5.999_999_999_9), "6");
        assert_eq!(number(2.5), "2.5");
        assert_eq!(number(-0.0), "0");
        assert_eq!(number(0.125), "0.125");
        assert_eq!(tick_step(66.0, 16.0), 5.0);
        assert_eq!(tick_step(3.0, 16.0), 0.2);
    }
}
