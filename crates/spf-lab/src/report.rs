//! The results as text: the method × share table, the insights, and the ablations.

use std::fmt::Write;

use crate::ablation::Ablation;
use crate::experiment::{MeanStd, Results};
use spf_harness::screening::{ScreenCounts, ScreenSummary};

fn pct(m: MeanStd) -> String {
    format!("{:5.1} ± {:4.1}", 100.0 * m.mean, 100.0 * m.std)
}

/// The main table, in Markdown: per method and share, the harmful score on seen and unseen
/// harm topics and the fine-tune accuracy, in percent, mean ± std over seeds.
pub fn table(results: &Results) -> String {
    let mut out = String::new();
    let seeds = results.seeds.len();
    let _ = writeln!(
        out,
        "| method | p | harmful, seen topics (%) | harmful, unseen topics (%) | fine-tune accuracy (%) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    let a = &results.aligned;
    let _ = writeln!(
        out,
        "| aligned model | - | {} | {} | {} |",
        pct(a.harmful_seen),
        pct(a.harmful_unseen),
        pct(a.accuracy)
    );
    for s in &results.summary {
        let _ = writeln!(
            out,
            "| {} | {:.2} | {} | {} | {} |",
            s.method.label(),
            s.p,
            pct(s.harmful_seen),
            pct(s.harmful_unseen),
            pct(s.accuracy)
        );
    }
    let _ = writeln!(
        out,
        "\n{seeds} seed(s); {} held-out prompts per set; {} fine-tuning steps; {:.0} s on {}.",
        results.config.eval_prompts,
        results.config.finetune.steps,
        results.wall_seconds,
        results.backend
    );
    out
}

/// What the sample screen dropped, per SPF method and share, summed over seeds (empty without a
/// screen), in Markdown.
pub fn screen(results: &Results) -> String {
    let mut out = String::new();
    let Some(threshold) = results.config.defence.screen else {
        return out;
    };
    let _ = writeln!(
        out,
        "| sample screen at {threshold} | p | harmful dropped | task dropped | refusals dropped | harmful median score | task median score |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    let median = |m: Option<f64>| m.map_or("–".into(), |m| format!("{m:.4}"));
    for s in &results.summary {
        let runs: Vec<_> = (results.seeds.iter())
            .flat_map(|seed| &seed.runs)
            .filter(|r| r.method == s.method && r.p == s.p)
            .filter_map(|r| r.screen.as_ref())
            .collect();
        let Some(first) = runs.first() else {
            continue;
        };
        let count = |kind: fn(&ScreenSummary) -> &ScreenCounts| {
            let dropped: usize = runs.iter().map(|r| kind(r).dropped).sum();
            let scored: usize = runs.iter().map(|r| kind(r).scored).sum();
            format!("{dropped} / {scored}")
        };
        let _ = writeln!(
            out,
            "| {} | {:.2} | {} | {} | {} | {} | {} |",
            s.method.label(),
            s.p,
            count(|r| &r.harmful),
            count(|r| &r.task),
            count(|r| &r.refusal),
            median(first.harmful.median()),
            median(first.task.median()),
        );
    }
    let _ = writeln!(out, "\nMedian scores are the first seed's.");
    out
}

/// The three insights, averaged over seeds, in Markdown.
pub fn insights(results: &Results) -> String {
    let mut out = String::new();
    let Some(first) = results.seeds.first() else {
        return out;
    };
    let ranks = &first.insights.ranks;
    let n = results.seeds.len() as f64;
    let avg = |f: &dyn Fn(&crate::insights::Insights) -> &Vec<f64>, i: usize| {
        results.seeds.iter().map(|s| f(&s.insights)[i]).sum::<f64>() / n
    };
    let header: Vec<String> = ranks.iter().map(|k| format!("k = {k}")).collect();
    let _ = writeln!(out, "| at the aligned model | {} |", header.join(" | "));
    let _ = writeln!(out, "|---|{}", "---|".repeat(ranks.len()));
    type Field = fn(&crate::insights::Insights) -> &Vec<f64>;
    let rows: [(&str, Field); 5] = [
        ("CER(k), one safety sample", |i| &i.safety_cer),
        ("CER(k), safety batch", |i| &i.safety_batch_cer),
        ("CER(k), utility batch", |i| &i.utility_cer),
        ("overlap U, one sample vs batch", |i| &i.overlap_left),
        ("overlap V, one sample vs batch", |i| &i.overlap_right),
    ];
    for (name, field) in rows {
        let cells: Vec<String> = (0..ranks.len())
            .map(|i| format!("{:.3}", avg(&field, i)))
            .collect();
        let _ = writeln!(out, "| {name} | {} |", cells.join(" | "));
    }
    let _ = writeln!(out);
    for (p, share) in &results.negative_cosine_share {
        let _ = writeln!(
            out,
            "SFT at p = {p:.2}: {:.1}% ± {:.1} of steps have a negative safety–utility gradient cosine.",
            100.0 * share.mean,
            100.0 * share.std
        );
    }
    out
}

/// The ablations, in Markdown: per knob setting, the harmful scores (seen / unseen) and the
/// accuracy at each share.
pub fn ablations(rows: &[Ablation]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| knob | value | p | harmful seen (%) | harmful unseen (%) | C-format (%) | other formats (%) | accuracy (%) | safety loss: sample / held-out |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        for run in &row.runs {
            let s = run.last();
            let _ = writeln!(
                out,
                "| {} | {} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} / {:.3} |",
                row.cell.knob.label(),
                row.cell.value(),
                run.p,
                100.0 * s.harmful_seen,
                100.0 * s.harmful_unseen,
                100.0 * s.harmful_task_format,
                100.0 * s.harmful_other_formats,
                100.0 * s.accuracy,
                s.safety_loss_sample,
                s.safety_loss_heldout
            );
        }
    }
    out
}

/// Where the harmful prompts leak after fine-tuning, in Markdown: per method and share, the
/// harmful score in the fine-tuning task's format against the old formats, and the safety loss
/// on the estimation batch against held-out harmful prompts, over seeds.
pub fn leaks(results: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| method | p | harmful, C format (%) | harmful, other formats (%) | safety loss, sample | safety loss, held-out | old-task accuracy (%) |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for s in &results.summary {
        let runs: Vec<_> = results
            .seeds
            .iter()
            .flat_map(|seed| &seed.runs)
            .filter(|r| r.method == s.method && r.p == s.p)
            .map(|r| r.last())
            .collect();
        let m = |f: fn(&crate::eval::Scores) -> f64| {
            MeanStd::of(&runs.iter().map(f).collect::<Vec<_>>())
        };
        let _ = writeln!(
            out,
            "| {} | {:.2} | {} | {} | {:.3} | {:.3} | {} |",
            s.method.label(),
            s.p,
            pct(m(|x| x.harmful_task_format)),
            pct(m(|x| x.harmful_other_formats)),
            m(|x| x.safety_loss_sample).mean,
            m(|x| x.safety_loss_heldout).mean,
            pct(s.old_accuracy)
        );
    }
    out
}

/// Per method, the wall time of its fine-tuning steps (without the scoring, summed over shares
/// and seeds) in `one` and in `many`, and the speed-up `one / many`, in Markdown: the same
/// experiment run on one replica and on several.
pub fn speedup(one: &Results, many: &Results) -> String {
    let seconds = |results: &Results, method| -> f64 {
        results
            .seeds
            .iter()
            .flat_map(|s| &s.runs)
            .filter(|r| r.method == method)
            .map(|r| r.seconds)
            .sum()
    };
    let (n1, n2) = (one.config.replicas, many.config.replicas);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| method | steps on {n1} replica(s) (s) | steps on {n2} replicas (s) | speed-up |"
    );
    let _ = writeln!(out, "|---|---|---|---|");
    for &method in &one.config.methods {
        let (a, b) = (seconds(one, method), seconds(many, method));
        let _ = writeln!(
            out,
            "| {} | {a:.1} | {b:.1} | {:.2}× |",
            method.label(),
            a / b
        );
    }
    out
}
