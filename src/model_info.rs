//! `flotilla model-info`: a model configuration's parameter breakdown.

use anyhow::{Context, Result, bail};
use clap::Args;
use flotilla_model::{ModelConfig, ParameterCounts, Preset};
use std::path::PathBuf;

#[derive(Args)]
#[command(group = clap::ArgGroup::new("source").required(true))]
pub struct ModelInfoArgs {
    /// A built-in configuration: deepseek-v3-671b, tiny or small.
    #[arg(long, group = "source")]
    preset: Option<String>,
    /// A configuration file: an HF `config.json` (.json) or flotilla TOML (.toml).
    #[arg(long, group = "source")]
    config: Option<PathBuf>,
    /// Print the counts as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: ModelInfoArgs) -> Result<()> {
    let (name, config) = resolve(args.preset.as_deref(), args.config.as_ref())?;
    let counts = ParameterCounts::of(&config);
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "model": name, "parameters": counts }))?
        );
    } else {
        print!("{}", format_counts(&name, &config, &counts));
    }
    Ok(())
}

/// The model named by `--preset` or `--config`, with the name to print for it.
pub(crate) fn resolve(preset: Option<&str>, config: Option<&PathBuf>) -> Result<(String, ModelConfig)> {
    match (preset, config) {
        (Some(preset), _) => Ok((preset.to_string(), preset.parse::<Preset>()?.config())),
        (None, Some(path)) => Ok((path.display().to_string(), load(path)?)),
        (None, None) => bail!("give --preset or --config"),
    }
}

/// Reads a config file by its extension.
pub(crate) fn load(path: &PathBuf) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    match path.extension().and_then(|e| e.to_str()) {
        Some("json") => {
            let loaded =
                ModelConfig::from_hf_json(&text).with_context(|| format!("in {}", path.display()))?;
            if !loaded.ignored_keys.is_empty() {
                tracing::info!(keys = ?loaded.ignored_keys, "config.json keys flotilla does not use");
            }
            Ok(loaded.config)
        }
        Some("toml") => Ok(ModelConfig::from_toml(&text).with_context(|| format!("in {}", path.display()))?),
        _ => bail!("{}: expected a .json (HF config) or .toml (flotilla) file", path.display()),
    }
}

fn human(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn format_counts(name: &str, config: &ModelConfig, c: &ParameterCounts) -> String {
    let mut out = format!(
        "{name}: {layers} layers ({dense} dense), hidden {d}, {heads} heads, {routed} routed experts \
         (top-{k} of {groups} groups, {kept} kept) + {shared} shared, MTP depth {mtp}\n\n",
        layers = config.num_hidden_layers,
        dense = (0..config.num_hidden_layers).filter(|&l| !config.is_moe_layer(l)).count(),
        d = config.hidden_size,
        heads = config.num_attention_heads,
        routed = config.n_routed_experts,
        k = config.num_experts_per_tok,
        groups = config.n_group,
        kept = config.topk_group,
        shared = config.n_shared_experts,
        mtp = config.num_nextn_predict_layers,
    );
    out += &format!(
        "{:<18} {:>18} {:>10} {:>18} {:>10} {:>18} {:>10}\n",
        "component", "main model", "", "activated/token", "", "MTP modules", ""
    );
    let columns = [c.main.components(), c.activated.components(), c.mtp.components()];
    for i in 0..columns[0].len() {
        let name = columns[0][i].0;
        let cells: Vec<String> =
            columns.iter().map(|col| format!("{:>18} {:>10}", col[i].1, human(col[i].1))).collect();
        out += &format!("{name:<18} {}\n", cells.join(" "));
    }
    let totals = [c.main.total(), c.activated.total(), c.mtp.total()];
    let cells: Vec<String> = totals.iter().map(|&t| format!("{t:>18} {:>10}", human(t))).collect();
    out += &format!("{:<18} {}\n\n", "total", cells.join(" "));
    out += &format!(
        "activated/token counts the embedding row a token reads; counted whole (total minus unused \
         routed experts) it is {} ({}).\n",
        c.activated_full_embedding.total(),
        human(c.activated_full_embedding.total())
    );
    out += &format!(
        "with MTP: {} ({}) trained; {} ({}) as an HF checkpoint stores it (MTP layers repeat the \
         embedding and head).\n",
        c.total_with_mtp(),
        human(c.total_with_mtp()),
        c.total_as_stored(),
        human(c.total_as_stored())
    );
    out
}
