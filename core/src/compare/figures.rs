//! The PNG figures of `trellis report`: learning curves of groups of runs with their spread over
//! seeds, one value per layer for each group, and one group's per-layer values over the epochs.
//! Drawn with plotters' bitmap backend and an embedded font, so a report looks the same on a
//! machine without fontconfig or any installed font (as the htsr plugin's charts).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, ensure, Result};
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

const FONT: &str = "sans-serif";
const SIZE: (u32, u32) = (1280, 720);
const LEGEND_WIDTH: u32 = 340;

/// One group's curve: mean over its seeds at each x, and the std band (mean ± std) around it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Band {
    pub label: String,
    pub x: Vec<f64>,
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

/// One group's value in each layer, in the order of the layer list; NaN where it has none.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LayerSeries {
    pub label: String,
    pub values: Vec<f64>,
}

/// A line of a chart: its finite points split where a value is missing, and an optional band.
struct Line {
    label: String,
    colour: RGBColor,
    segments: Vec<Vec<(f64, f64)>>,
    band: Vec<(f64, f64, f64)>,
}

/// Group colours (Tableau 10): distinct for the handful of groups a comparison has.
const PALETTE: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

fn group_colour(i: usize) -> RGBColor {
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b)
}

/// Input layers red through output layers violet, as the htsr plugin draws them.
fn depth_colour(i: usize, n: usize) -> RGBColor {
    let depth = i as f64 / (n.max(2) - 1) as f64;
    let (r, g, b) = HSLColor(0.8 * depth, 0.85, 0.42).rgb();
    RGBColor(r, g, b)
}

/// A group's learning curve (e.g. top-1 over epochs) with a shaded mean ± std band.
pub fn learning_curves(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    groups: &[Band],
) -> Result<()> {
    ensure!(!groups.is_empty(), "{title}: nothing to plot (no groups)");
    let lines = groups
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let band = (g.x.iter().zip(&g.mean).zip(&g.std))
                .filter(|((x, m), s)| x.is_finite() && m.is_finite() && s.is_finite())
                .map(|((&x, &m), &s)| (x, m - s, m + s))
                .collect();
            Line {
                label: g.label.clone(),
                colour: group_colour(i),
                segments: segments(g.x.iter().copied().zip(g.mean.iter().copied())),
                band,
            }
        })
        .collect::<Vec<_>>();
    chart(path, title, x_label, y_label, &lines, None, false)
}

/// A per-layer value for each group (e.g. the density each pruner kept in each layer): layers
/// along x in the given order, one line per group; y over [0, 1] when `unit_interval`.
pub fn per_layer(
    path: &Path,
    title: &str,
    y_label: &str,
    layers: &[String],
    groups: &[LayerSeries],
    unit_interval: bool,
) -> Result<()> {
    ensure!(!layers.is_empty(), "{title}: nothing to plot (no layers)");
    for g in groups {
        ensure!(
            g.values.len() == layers.len(),
            "{title}: group {:?} has {} values for {} layers",
            g.label,
            g.values.len(),
            layers.len()
        );
    }
    let lines = groups
        .iter()
        .enumerate()
        .map(|(i, g)| Line {
            label: g.label.clone(),
            colour: group_colour(i),
            segments: segments(g.values.iter().enumerate().map(|(x, &y)| (x as f64, y))),
            band: Vec::new(),
        })
        .collect::<Vec<_>>();
    chart(
        path,
        title,
        "layer",
        y_label,
        &lines,
        Some(layers),
        unit_interval,
    )
}

/// One value per layer over the epochs for one group (e.g. α of every layer): one line per layer
/// coloured by depth. `values[layer][epoch]`, NaN = missing.
pub fn layers_over_epochs(
    path: &Path,
    title: &str,
    y_label: &str,
    epochs: &[f64],
    layers: &[String],
    values: &[Vec<f64>],
) -> Result<()> {
    ensure!(
        values.len() == layers.len(),
        "{title}: {} rows of values for {} layers",
        values.len(),
        layers.len()
    );
    let lines = layers
        .iter()
        .zip(values)
        .enumerate()
        .map(|(i, (layer, row))| Line {
            label: layer.clone(),
            colour: depth_colour(i, layers.len()),
            segments: segments(epochs.iter().copied().zip(row.iter().copied())),
            band: Vec::new(),
        })
        .collect::<Vec<_>>();
    chart(path, title, "epoch", y_label, &lines, None, false)
}

fn segments(points: impl Iterator<Item = (f64, f64)>) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    for (x, y) in points {
        if x.is_finite() && y.is_finite() {
            out.last_mut().unwrap().push((x, y));
        } else if !out.last().unwrap().is_empty() {
            out.push(Vec::new());
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// ab_glyph renders only fonts it is handed; registering once per process is enough.
fn font_ready() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        register_font(FONT, FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT).is_ok()
    });
    ensure!(ok, "the embedded plot font could not be loaded");
    Ok(())
}

/// Ticks with as many decimals as the axis span needs.
fn tick_label(value: f64, span: f64) -> String {
    let value = if value.abs() < span * 1e-9 {
        0.0
    } else {
        value
    };
    if span < 1e-3 {
        return format!("{value:.2e}");
    }
    let decimals = (1.0 - span.log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{value:.decimals$}")
}

/// The last `max` characters of a long layer name, which is where layers differ.
fn short(name: &str, max: usize) -> String {
    let chars: Vec<char> = name.chars().collect();
    if chars.len() <= max {
        return name.to_string();
    }
    let tail: String = chars[chars.len() - (max - 1)..].iter().collect();
    format!("…{tail}")
}

fn chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    lines: &[Line],
    x_names: Option<&[String]>,
    unit_interval: bool,
) -> Result<()> {
    font_ready()?;
    let failed = |e: &dyn std::fmt::Display| anyhow!("cannot draw {}: {e}", path.display());
    let points = lines.iter().flat_map(|l| l.segments.iter().flatten());
    let xs = points.clone().map(|p| p.0);
    let ys = points.map(|p| p.1).chain(
        lines
            .iter()
            .flat_map(|l| l.band.iter().flat_map(|b| [b.1, b.2])),
    );
    let bounds = |v: &mut dyn Iterator<Item = f64>| {
        v.fold(None, |acc: Option<(f64, f64)>, x| {
            Some(acc.map_or((x, x), |(lo, hi)| (lo.min(x), hi.max(x))))
        })
    };
    let (x_min, x_max) = bounds(&mut { xs })
        .ok_or_else(|| anyhow!("{title}: nothing to plot (every value is missing)"))?;
    let (y_min, y_max) = bounds(&mut { ys }).unwrap();
    let (x_min, x_max) = if x_max > x_min {
        (x_min, x_max)
    } else {
        (x_min - 1.0, x_max + 1.0)
    };
    let pad = if y_max > y_min {
        0.05 * (y_max - y_min)
    } else {
        0.1 * y_max.abs().max(1e-6)
    };
    let (y_min, y_max) = if unit_interval {
        (y_min.min(0.0) - 0.02, y_max.max(1.0) + 0.02)
    } else {
        (y_min - pad, y_max + pad)
    };
    let span = y_max - y_min;

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| failed(&e))?;
    let (plot_area, legend_area) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);
    let x_pad = if x_names.is_some() { 0.5 } else { 0.0 };
    let mut ctx = ChartBuilder::on(&plot_area)
        .caption(title, (FONT, 26))
        .margin(18)
        .x_label_area_size(if x_names.is_some() { 150 } else { 56 })
        .y_label_area_size(96)
        .build_cartesian_2d((x_min - x_pad)..(x_max + x_pad), y_min..y_max)
        .map_err(|e| failed(&e))?;
    let name_of = |x: &f64| match x_names {
        Some(names) if x.fract() == 0.0 && *x >= 0.0 => names
            .get(*x as usize)
            .map_or(String::new(), |n| short(n, 22)),
        Some(_) => String::new(),
        None if (x_max - x_min) >= 5.0 => format!("{x:.0}"),
        None => tick_label(*x, x_max - x_min),
    };
    let y_tick = |y: &f64| tick_label(*y, span);
    let mut mesh = ctx.configure_mesh();
    mesh.x_desc(x_label)
        .y_desc(y_label)
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .x_label_formatter(&name_of)
        .y_label_formatter(&y_tick)
        .light_line_style(WHITE.mix(0.0));
    if let Some(names) = x_names {
        mesh.x_labels(names.len() + 1).x_label_style(
            (FONT, 13)
                .into_font()
                .transform(FontTransform::Rotate90)
                .color(&BLACK),
        );
    }
    mesh.draw().map_err(|e| failed(&e))?;
    for line in lines {
        if !line.band.is_empty() {
            let upper = line.band.iter().map(|b| (b.0, b.2));
            let lower = line.band.iter().rev().map(|b| (b.0, b.1));
            let polygon: Vec<(f64, f64)> = upper.chain(lower).collect();
            ctx.draw_series(std::iter::once(Polygon::new(
                polygon,
                line.colour.mix(0.18).filled(),
            )))
            .map_err(|e| failed(&e))?;
        }
        for segment in &line.segments {
            ctx.draw_series(LineSeries::new(
                segment.iter().copied(),
                line.colour.stroke_width(2),
            ))
            .map_err(|e| failed(&e))?;
            ctx.draw_series(
                segment
                    .iter()
                    .map(|&p| Circle::new(p, 3, line.colour.filled())),
            )
            .map_err(|e| failed(&e))?;
        }
    }

    // The legend beside the chart: as many entries as fit the height, then a count of the rest.
    let row = ((SIZE.1 as usize - 40) / lines.len().max(1)).clamp(12, 28) as i32;
    let fits = ((SIZE.1 as i32 - 40) / row) as usize;
    let font = (f64::from(row) * 0.7).clamp(9.0, 16.0);
    for (i, line) in lines.iter().take(fits).enumerate() {
        let y = 30 + i as i32 * row;
        legend_area
            .draw(&PathElement::new(
                vec![(8, y), (36, y)],
                line.colour.stroke_width(3),
            ))
            .map_err(|e| failed(&e))?;
        let label = if i + 1 == fits && lines.len() > fits {
            format!("… and {} more", lines.len() - fits + 1)
        } else {
            short(&line.label, 40)
        };
        legend_area
            .draw(&Text::new(label, (44, y - font as i32 / 2), (FONT, font)))
            .map_err(|e| failed(&e))?;
    }
    root.present().map_err(|e| failed(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_values_split_a_line_instead_of_joining_across_them() {
        let s = segments([(0.0, 1.0), (1.0, f64::NAN), (2.0, 3.0), (3.0, 4.0)].into_iter());
        assert_eq!(s, [vec![(0.0, 1.0)], vec![(2.0, 3.0), (3.0, 4.0)]]);
    }

    #[test]
    fn the_three_figures_are_written_as_png() {
        let dir = tempfile::tempdir().unwrap();
        let band = |label: &str, shift: f64| Band {
            label: label.into(),
            x: vec![1.0, 2.0, 3.0],
            mean: vec![0.3 + shift, 0.5 + shift, 0.6 + shift],
            std: vec![0.02, 0.03, 0.01],
        };
        let curves = dir.path().join("curve.png");
        learning_curves(
            &curves,
            "top1",
            "epoch",
            "top1",
            &[band("a", 0.0), band("b", 0.1)],
        )
        .unwrap();
        let layers: Vec<String> = ["conv1", "layer1.0.conv1", "fc"].map(String::from).to_vec();
        let density = dir.path().join("density.png");
        let series = LayerSeries {
            label: "snip".into(),
            values: vec![0.9, f64::NAN, 0.4],
        };
        per_layer(&density, "density", "density", &layers, &[series], true).unwrap();
        let alpha = dir.path().join("alpha.png");
        let values = vec![vec![3.0, 2.9], vec![4.0, 3.5], vec![5.0, f64::NAN]];
        layers_over_epochs(&alpha, "α", "α", &[1.0, 2.0], &layers, &values).unwrap();
        for p in [curves, density, alpha] {
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", p.display());
            assert!(bytes.len() > 5_000, "{} is nearly empty", p.display());
        }
        let empty = LayerSeries {
            label: "x".into(),
            values: vec![f64::NAN; 3],
        };
        let e = per_layer(&dir.path().join("e.png"), "d", "d", &layers, &[empty], true);
        assert!(e.unwrap_err().to_string().contains("nothing to plot"));
    }
}
