//! Line charts of one value per layer over the epochs, as PNG: one line per layer, coloured
//! from the input (red) to the output (violet), with the layer names listed beside the chart.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};
use trellis_sdk::{Error, Result};

use crate::{History, LayerPoint};

/// The family name the embedded font is registered under.
const FONT: &str = "sans-serif";
const SIZE: (u32, u32) = (1280, 720);
const LEGEND_WIDTH: u32 = 320;

pub struct Chart {
    pub title: &'static str,
    pub y_label: &'static str,
    pub value: fn(&LayerPoint) -> Option<f64>,
}

/// ab_glyph renders only fonts it is handed; registering once per process is enough.
fn font_ready() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        register_font(FONT, FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(Error::msg("the embedded plot font could not be loaded"))
    }
}

/// Tick labels with as many decimals as the axis span needs (learning rates are small); a
/// tick at zero plus rounding noise still reads 0.
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

pub fn draw(path: &Path, chart: &Chart, history: &History) -> Result<()> {
    font_ready()?;
    let failed = |e: &dyn std::fmt::Display| Error::msg(format!("drawing {}: {e}", path.display()));

    // Layers in order of first appearance (registration order), and each one's (epoch, value).
    let mut layers: Vec<&str> = Vec::new();
    for (_, points) in history {
        for p in points {
            if !layers.contains(&p.layer.as_str()) {
                layers.push(&p.layer);
            }
        }
    }
    let series: Vec<Vec<(i64, f64)>> = layers
        .iter()
        .map(|layer| {
            history
                .iter()
                .filter_map(|(epoch, points)| {
                    let point = points.iter().find(|p| p.layer == *layer)?;
                    Some((*epoch as i64, (chart.value)(point)?))
                })
                .filter(|(_, v)| v.is_finite())
                .collect()
        })
        .collect();
    let all = series.iter().flatten();
    let (x_min, x_max) = all.clone().fold((i64::MAX, i64::MIN), |(lo, hi), &(x, _)| {
        (lo.min(x), hi.max(x))
    });
    let (y_min, y_max) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, y)| {
        (lo.min(y), hi.max(y))
    });
    if x_min > x_max {
        return Err(Error::msg(format!("{}: nothing to plot yet", chart.title)));
    }
    let (x_min, x_max) = if x_min == x_max {
        (x_min - 1, x_max + 1)
    } else {
        (x_min, x_max)
    };
    let pad = if y_max > y_min {
        0.05 * (y_max - y_min)
    } else {
        0.1 * y_max.abs().max(1e-6)
    };
    let (y_min, y_max) = (y_min - pad, y_max + pad);
    let span = (y_max - y_min).max(f64::MIN_POSITIVE);

    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| failed(&e))?;
    let (plot_area, legend_area) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);
    let mut ctx = ChartBuilder::on(&plot_area)
        .caption(chart.title, (FONT, 26))
        .margin(18)
        .x_label_area_size(56)
        .y_label_area_size(96)
        .build_cartesian_2d(x_min..x_max, y_min..y_max)
        .map_err(|e| failed(&e))?;
    ctx.configure_mesh()
        .x_desc("epoch")
        .y_desc(chart.y_label)
        .label_style((FONT, 16))
        .axis_desc_style((FONT, 18))
        .x_labels(((x_max - x_min + 1) as usize).min(12))
        .y_label_formatter(&|y| tick_label(*y, span))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| failed(&e))?;
    let colour = |i: usize| {
        let depth = i as f64 / (layers.len().max(2) - 1) as f64;
        HSLColor(0.8 * depth, 0.85, 0.42)
    };
    for (i, points) in series.iter().enumerate() {
        let c = colour(i);
        ctx.draw_series(LineSeries::new(points.iter().copied(), c.stroke_width(2)))
            .map_err(|e| failed(&e))?;
        ctx.draw_series(points.iter().map(|&p| Circle::new(p, 3, c.filled())))
            .map_err(|e| failed(&e))?;
    }

    // The legend: one line per layer, as many as fit in the height.
    let rows = layers.len().max(1) as u32;
    let row_height = ((SIZE.1 - 70) / rows).clamp(8, 26) as i32;
    let font_size = (row_height as f64 * 0.72).clamp(8.0, 16.0);
    legend_area
        .draw(&Text::new(
            "layers, input to output",
            (8, 24),
            (FONT, 16).into_font(),
        ))
        .map_err(|e| failed(&e))?;
    for (i, layer) in layers.iter().enumerate() {
        let y = 56 + i as i32 * row_height;
        let c = colour(i);
        legend_area
            .draw(&PathElement::new(vec![(8, y), (36, y)], c.stroke_width(3)))
            .map_err(|e| failed(&e))?;
        let style =
            TextStyle::from((FONT, font_size).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
        legend_area
            .draw(&Text::new(layer.to_string(), (44, y), style))
            .map_err(|e| failed(&e))?;
    }
    root.present().map_err(|e| failed(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::tick_label;

    #[test]
    fn tick_labels_follow_the_axis_span() {
        assert_eq!(tick_label(0.14, 0.15), "0.14");
        assert_eq!(tick_label(3.47e-18, 0.15), "0.00");
        assert_eq!(tick_label(2.5, 2.4), "2.5");
        assert_eq!(tick_label(1e-4, 5e-4), "1.00e-4");
    }
}
