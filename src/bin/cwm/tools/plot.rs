//! SVG plots of benchmark reports (`cwm bench … --plot FILE.svg`, `cwm plot REPORT.json`): one
//! panel per measured figure, its bar beside the ceiling and the peer measured in the same run,
//! the target ratio drawn as a line.

use std::path::Path;

use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use serde_json::Value;

/// One measured figure and what it is compared with.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// What was measured.
    pub name: String,
    /// Unit of every value of the panel.
    pub unit: &'static str,
    /// cwm's figure.
    pub measured: f64,
    /// The ceiling measured in the same run: (label, value).
    pub ceiling: Option<(String, f64)>,
    /// A peer's way of doing the same, measured in the same run: (label, value).
    pub peer: Option<(String, f64)>,
    /// The target, as a fraction of the ceiling.
    pub target: Option<f64>,
}

impl Figure {
    fn new(name: &str, unit: &'static str, measured: f64) -> Figure {
        Figure {
            name: name.to_string(),
            unit,
            measured,
            ceiling: None,
            peer: None,
            target: None,
        }
    }

    fn ceiling(mut self, label: &str, v: f64, target: Option<f64>) -> Figure {
        self.ceiling = Some((label.to_string(), v));
        self.target = target;
        self
    }

    fn peer(mut self, label: &str, v: f64) -> Figure {
        self.peer = Some((label.to_string(), v));
        self
    }

    /// measured / ceiling, when there is a ceiling above zero.
    pub fn ratio(&self) -> Option<f64> {
        self.ceiling
            .as_ref()
            .and_then(|(_, c)| (*c > 0.0).then(|| self.measured / c))
    }
}

fn num(v: &Value, key: &str) -> Result<f64, String> {
    v.get(key)
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("the report has no number {key:?}"))
}

/// The title and figures of a report of `cwm bench store|pipeline|compaction|control|recovery
/// --json` or of `cwm gpu-check` / `scripts/gpu-check.sh` (its `bench` object).
pub fn figures(v: &Value) -> Result<(String, Vec<Figure>), String> {
    let gb = "GB/s";
    if let Some(b) = v.get("bench").filter(|b| b.get("gather_gbps").is_some()) {
        return gpu_figures(b);
    }
    if v.get("write_gbps").is_some() {
        let t = format!(
            "cwm bench store ({} MiB, {} engine)",
            num(v, "bytes")? as u64 >> 20,
            v.get("engine").and_then(Value::as_str).unwrap_or("")
        );
        return Ok((
            t,
            vec![
                with_fio(
                    Figure::new("store write", gb, num(v, "write_gbps")?).ceiling(
                        "raw O_DIRECT write",
                        num(v, "raw_write_gbps")?,
                        Some(0.90),
                    ),
                    v,
                    "fio_write_gbps",
                ),
                with_fio(
                    Figure::new("store read", gb, num(v, "read_gbps")?).ceiling(
                        "raw O_DIRECT read",
                        num(v, "raw_read_gbps")?,
                        Some(0.90),
                    ),
                    v,
                    "fio_read_gbps",
                ),
            ],
        ));
    }
    if v.get("freeze_gbps").is_some() && v.get("tier_thaw_gbps").is_some() {
        let t = format!(
            "cwm bench pipeline ({} tokens, {} MiB)",
            num(v, "tokens")?,
            num(v, "bytes")? as u64 >> 20
        );
        return Ok((
            t,
            vec![
                Figure::new("freeze", gb, num(v, "freeze_gbps")?).ceiling(
                    "raw disk write",
                    num(v, "raw_write_gbps")?,
                    Some(0.90),
                ),
                Figure::new("thaw", gb, num(v, "thaw_gbps")?).ceiling(
                    "raw disk read",
                    num(v, "raw_read_gbps")?,
                    Some(0.90),
                ),
                Figure::new("thaw from the RAM tier", gb, num(v, "tier_thaw_gbps")?).ceiling(
                    "bare scatter",
                    num(v, "tier_scatter_gbps")?,
                    Some(0.85),
                ),
            ],
        ));
    }
    if v.get("fsck_gbps").is_some() {
        return Ok((
            "cwm bench compaction".to_string(),
            vec![
                Figure::new("fsck (read + verify)", gb, num(v, "fsck_gbps")?).ceiling(
                    "raw disk read",
                    num(v, "raw_read_gbps")?,
                    Some(0.90),
                ),
                Figure::new(
                    "freeze beside a compaction",
                    gb,
                    num(v, "freeze_during_compaction_gbps")?,
                )
                .ceiling("freeze alone", num(v, "freeze_alone_gbps")?, None),
                Figure::new("compaction", gb, num(v, "compaction_gbps")?),
            ],
        ));
    }
    if v.get("clients").is_some() && v.get("freeze_gbps").is_some() {
        let t = format!(
            "cwm bench churn ({} clients under a {} MiB budget)",
            num(v, "clients")?,
            num(v, "capacity")? as u64 >> 20
        );
        return Ok((
            t,
            vec![
                Figure::new("aggregate freeze", gb, num(v, "freeze_gbps")?).ceiling(
                    "raw disk write",
                    num(v, "raw_write_gbps")?,
                    Some(0.85),
                ),
                Figure::new("lookup p99 during eviction", "µs", num(v, "lookup_p99_us")?).ceiling(
                    "1 ms target",
                    1000.0,
                    None,
                ),
            ],
        ));
    }
    if v.get("stat_p50_us").is_some() {
        let t = format!("cwm bench control ({} windows)", num(v, "windows")?);
        let us = "µs";
        return Ok((
            t,
            vec![
                Figure::new("stat p50", us, num(v, "stat_p50_us")?),
                Figure::new("stat p99", us, num(v, "stat_p99_us")?),
                Figure::new("list p50", us, num(v, "list_p50_us")?),
                Figure::new("list p99", us, num(v, "list_p99_us")?),
                Figure::new(
                    "freeze + thaw",
                    "round trips/s",
                    num(v, "freeze_thaw_per_sec")?,
                ),
            ],
        ));
    }
    if let Some(points) = v.get("points").and_then(Value::as_array) {
        return trace_figures(v, points);
    }
    if v.get("open_seconds").is_some() {
        let t = format!("cwm bench recovery ({} records)", num(v, "records")?);
        return Ok((
            t,
            vec![
                Figure::new("reopen after a clean stop", "s", num(v, "open_seconds")?)
                    .ceiling("target", 2.0, None),
                Figure::new(
                    "reopen after kill -9",
                    "s",
                    num(v, "open_after_kill_seconds")?,
                )
                .ceiling("target", 5.0, None),
                Figure::new("full scan", "s", num(v, "open_full_scan_seconds")?),
            ],
        ));
    }
    Err("not a report of cwm bench or cwm gpu-check".into())
}

/// The figures of a GPU report's `bench` object.
fn gpu_figures(b: &Value) -> Result<(String, Vec<Figure>), String> {
    let gb = "GB/s";
    let dev = b.get("device").and_then(Value::as_str).unwrap_or("GPU");
    let (d2h, h2d) = (num(b, "d2h_pinned_gbps")?, num(b, "h2d_pinned_gbps")?);
    let mut figs = vec![
        Figure::new(
            "gather (freeze, GPU to pinned host)",
            gb,
            num(b, "gather_gbps")?,
        )
        .ceiling("D2H copy", d2h, Some(0.93)),
        Figure::new(
            "scatter (thaw, pinned host to GPU)",
            gb,
            num(b, "scatter_gbps")?,
        )
        .ceiling("H2D copy", h2d, Some(0.93)),
        Figure::new("thaw from the RAM tier", gb, num(b, "tier_thaw_gbps")?).ceiling(
            "H2D copy",
            h2d,
            Some(0.85),
        ),
        Figure::new("freeze end to end", gb, num(b, "freeze_gbps")?).ceiling(
            "raw disk write",
            num(b, "raw_write_gbps")?,
            Some(0.90),
        ),
        Figure::new("thaw end to end", gb, num(b, "thaw_gbps")?).ceiling(
            "raw disk read",
            num(b, "raw_read_gbps")?,
            Some(0.90),
        ),
    ];
    if let Ok(t) = num(b, "torch_gather_gbps") {
        figs[0] = figs[0].clone().peer("torch index_select + D2H", t);
    }
    if let Ok(t) = num(b, "torch_scatter_gbps") {
        figs[1] = figs[1].clone().peer("torch H2D + index_copy_", t);
    }
    Ok((format!("cwm on {dev}: figure vs ceiling vs peer"), figs))
}

/// The figures of a `cwm bench trace` report: one per capacity.
fn trace_figures(v: &Value, points: &[Value]) -> Result<(String, Vec<Figure>), String> {
    let policy = v.get("policy").and_then(Value::as_str).unwrap_or("lru");
    let t = format!(
        "cwm bench trace: {} ({} requests); prefix hit ratio by capacity",
        v.get("trace").and_then(Value::as_str).unwrap_or(""),
        num(v, "requests")?
    );
    let mut figs = Vec::new();
    for p in points {
        let f = num(p, "capacity_fraction")?;
        let hit = |k: &str| {
            p.pointer(&format!("/{k}/block_ratio"))
                .and_then(Value::as_f64)
                .ok_or_else(|| format!("the report has no {k} hit ratio"))
        };
        figs.push(
            Figure::new(
                &format!("{policy} at {:.0}% of unique blocks", f * 100.0),
                "hit ratio",
                hit(policy)?,
            )
            .ceiling("Belady (offline)", hit("belady")?, None)
            .peer("block-level LRU", hit("block_lru")?),
        );
    }
    Ok((t, figs))
}

/// fio's figure, when the report has one, as the figure's second (independent) ceiling.
fn with_fio(f: Figure, v: &Value, key: &str) -> Figure {
    match v.get(key).and_then(Value::as_f64) {
        Some(x) => f.peer("fio (2nd ceiling)", x),
        None => f,
    }
}

const MEASURED: RGBColor = RGBColor(31, 119, 180);
const CEILING: RGBColor = RGBColor(150, 150, 150);
const PEER: RGBColor = RGBColor(255, 127, 14);

/// Draws `figs` under `title` into the SVG file `path`.
pub fn draw(path: &Path, title: &str, figs: &[Figure]) -> Result<(), String> {
    let e = |x: &dyn std::fmt::Debug| format!("plot {}: {x:?}", path.display());
    if figs.is_empty() {
        return Err(e(&"no figures"));
    }
    let cols = figs.len().min(3);
    let rows = figs.len().div_ceil(cols);
    let size = (420 * cols as u32, 280 * rows as u32 + 40);
    let root = SVGBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let root = root.titled(title, ("sans-serif", 18)).map_err(|x| e(&x))?;
    for (area, fig) in root.split_evenly((rows, cols)).iter().zip(figs) {
        panel(area, fig).map_err(|x| e(&x))?;
    }
    root.present().map_err(|x| e(&x))
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn panel(area: &Area<'_>, fig: &Figure) -> Result<(), String> {
    let s = |e: &dyn std::fmt::Debug| format!("{e:?}");
    let mut bars = vec![("cwm".to_string(), fig.measured, MEASURED)];
    if let Some((l, v)) = &fig.ceiling {
        bars.push((l.clone(), *v, CEILING));
    }
    if let Some((l, v)) = &fig.peer {
        bars.push((l.clone(), *v, PEER));
    }
    let top = bars.iter().map(|b| b.1).fold(0.0f64, f64::max).max(1e-9) * 1.25;
    let verdict = match (fig.ratio(), fig.target) {
        (Some(r), Some(t)) => format!(
            "{r:.3} x ceiling, target {t:.2}: {}",
            if r >= t { "met" } else { "missed" }
        ),
        (Some(r), None) => format!("{r:.3} x {}", bars[1].0),
        _ => String::new(),
    };
    let mut chart = ChartBuilder::on(area)
        .caption(&fig.name, ("sans-serif", 13))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(52)
        .build_cartesian_2d((0..bars.len() - 1).into_segmented(), 0f64..top)
        .map_err(|x| s(&x))?;
    let labels: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .y_desc(fig.unit)
        .x_label_style(("sans-serif", 9))
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(|x| s(&x))?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, v, c))| {
            let mut r = Rectangle::new(
                [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), *v),
                ],
                c.filled(),
            );
            r.set_margin(0, 0, 14, 14);
            r
        }))
        .map_err(|x| s(&x))?;
    chart
        .draw_series(bars.iter().enumerate().map(|(i, (_, v, _))| {
            Text::new(
                format!("{}", Sig(*v)),
                (SegmentValue::CenterOf(i), *v + top * 0.02),
                ("sans-serif", 11),
            )
        }))
        .map_err(|x| s(&x))?;
    if !verdict.is_empty() {
        chart
            .draw_series(std::iter::once(Text::new(
                verdict,
                (SegmentValue::Exact(0), top * 0.97),
                ("sans-serif", 11),
            )))
            .map_err(|x| s(&x))?;
    }
    if let (Some((_, c)), Some(t)) = (&fig.ceiling, fig.target) {
        let y = c * t;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(SegmentValue::Exact(0), y), (SegmentValue::Last, y)],
                RED.stroke_width(1),
            )))
            .map_err(|x| s(&x))?;
    }
    Ok(())
}

/// A value with three significant digits.
struct Sig(f64);

impl std::fmt::Display for Sig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = self.0;
        if v.abs() >= 100.0 {
            write!(f, "{v:.0}")
        } else if v.abs() >= 10.0 {
            write!(f, "{v:.1}")
        } else {
            write!(f, "{v:.2}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_report_becomes_two_figures_with_ceilings() {
        let v = serde_json::json!({"bytes": 1u64 << 30, "engine": "uring", "write_gbps": 1.8,
            "raw_write_gbps": 2.0, "read_gbps": 1.0, "raw_read_gbps": 2.0});
        let (t, f) = figures(&v).unwrap();
        assert!(t.contains("1024 MiB"), "{t}");
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].ratio(), Some(0.9));
        assert_eq!(f[1].ratio(), Some(0.5));
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.svg");
        draw(&p, &t, &f).unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        assert!(svg.contains("0.900 x ceiling, target 0.90: met"));
        assert!(svg.contains("0.500 x ceiling, target 0.90: missed"));
        assert!(svg.contains("raw O_DIRECT read"));
    }

    #[test]
    fn a_gpu_report_has_peers_and_an_unknown_report_is_refused() {
        let b = serde_json::json!({"bench": {"device": "H200", "gather_gbps": 52.0,
            "d2h_pinned_gbps": 55.0, "scatter_gbps": 51.0, "h2d_pinned_gbps": 55.5,
            "tier_thaw_gbps": 40.0, "freeze_gbps": 2.5, "raw_write_gbps": 2.3,
            "thaw_gbps": 2.1, "raw_read_gbps": 2.0, "torch_gather_gbps": 50.7}});
        let (_, f) = figures(&b).unwrap();
        assert_eq!(f.len(), 5);
        assert_eq!(f[0].peer.as_ref().map(|p| p.1), Some(50.7));
        assert!(f[1].peer.is_none());
        assert!(figures(&serde_json::json!({"x": 1})).is_err());
        assert!(figures(&serde_json::json!({"write_gbps": 1.0})).is_err());
    }
}
