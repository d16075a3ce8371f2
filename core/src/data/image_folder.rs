//! A user's own images in torchvision's `ImageFolder` layout: `root/train/<class>/*.png|jpg`
//! and `root/test/<class>/...` (or `root/val/<class>/...`). Classes are the sorted names of the
//! training split's folders, as torchvision numbers them; every image is resized to a square
//! of the configured side (bilinear with antialiasing, as torchvision's `Resize`) and kept as
//! u8 RGB or grey.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use tch::Tensor;

use super::Dataset;

const EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];
const LAYOUT: &str = "data.path should hold train/<class>/*.png|jpg and test/<class>/... \
                      (or val/<class>/...), one folder per class";

/// The class names of the training split: its subfolders, sorted.
pub fn class_names(root: &Path) -> anyhow::Result<Vec<String>> {
    let train = root.join("train");
    let entries = std::fs::read_dir(&train)
        .with_context(|| format!("cannot read the image folder {}: {LAYOUT}", train.display()))?;
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    if names.is_empty() {
        bail!("{} has no class folders: {LAYOUT}", train.display());
    }
    Ok(names)
}

/// Reads both splits of the image folder at `root`, `channels` 1 (grey) or 3 (RGB), resized to
/// `side` × `side`.
pub fn read_image_folder(
    root: &Path,
    channels: i64,
    side: u32,
) -> anyhow::Result<(Dataset, Dataset)> {
    let classes = class_names(root)?;
    let test_root = ["test", "val"]
        .map(|n| root.join(n))
        .into_iter()
        .find(|p| p.is_dir())
        .with_context(|| {
            format!(
                "{} has neither a test nor a val folder: {LAYOUT}",
                root.display()
            )
        })?;
    let train = read_split(&root.join("train"), &classes, channels, side)?;
    let test = read_split(&test_root, &classes, channels, side)?;
    Ok((train, test))
}

/// The images of one split. The test split may lack classes, but not add any.
fn read_split(dir: &Path, classes: &[String], channels: i64, side: u32) -> anyhow::Result<Dataset> {
    let mut files: Vec<(PathBuf, i64)> = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !path.is_dir() || name.starts_with('.') {
            continue;
        }
        let Some(label) = classes.iter().position(|c| c == name) else {
            bail!(
                "{} is a class the training split does not have (its classes: {}); \
                 remove it or add train/{name}",
                path.display(),
                classes.join(", ")
            );
        };
        let before = files.len();
        for image in std::fs::read_dir(&path)? {
            let image = image?.path();
            let extension = image
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase);
            if extension.is_some_and(|e| EXTENSIONS.contains(&e.as_str())) {
                files.push((image, label as i64));
            }
        }
        if files.len() == before {
            bail!("{} holds no .png or .jpg images: {LAYOUT}", path.display());
        }
    }
    if files.is_empty() {
        bail!(
            "{} holds no class folders with images: {LAYOUT}",
            dir.display()
        );
    }
    // Sorted paths make the dataset's order, and so every run's subset, independent of the
    // file system's listing order.
    files.sort();
    let plane = (side * side) as usize * channels as usize;
    let mut pixels = vec![0u8; files.len() * plane];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = files.len().div_ceil(threads);
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = files
            .chunks(per_thread)
            .zip(pixels.chunks_mut(per_thread * plane))
            .map(|(files, out)| {
                scope.spawn(move || -> anyhow::Result<()> {
                    for ((path, _), out) in files.iter().zip(out.chunks_exact_mut(plane)) {
                        decode_into(path, channels, side, out)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("image decoding does not panic")?;
        }
        Ok(())
    })?;
    let labels: Vec<i64> = files.iter().map(|(_, l)| *l).collect();
    let n = labels.len() as i64;
    let side = i64::from(side);
    Dataset::new(
        Tensor::from_slice(&pixels).view([n, channels, side, side]),
        Tensor::from_slice(&labels),
        classes.len() as i64,
    )
}

/// Decodes one image into `out`, channel-major (`[C, side, side]`).
fn decode_into(path: &Path, channels: i64, side: u32, out: &mut [u8]) -> anyhow::Result<()> {
    let image = image::open(path).with_context(|| {
        format!(
            "cannot decode {} as an image (corrupt, or not the format its extension says?)",
            path.display()
        )
    })?;
    let image = if image.width() == side && image.height() == side {
        image
    } else {
        image.resize_exact(side, side, image::imageops::FilterType::Triangle)
    };
    let plane = (side * side) as usize;
    if channels == 1 {
        out.copy_from_slice(image.to_luma8().as_raw());
    } else {
        for (p, rgb) in image.to_rgb8().as_raw().chunks_exact(3).enumerate() {
            for c in 0..3 {
                out[c * plane + p] = rgb[c];
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn save(path: &Path, width: u32, height: u32, colour: [u8; 3]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(width, height, image::Rgb(colour))
            .save(path)
            .unwrap();
    }

    #[test]
    fn data_image_folder_reads_resizes_and_labels_by_sorted_class() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        save(&root.join("train/dog/b.png"), 8, 6, [10, 20, 30]);
        save(&root.join("train/dog/a.jpg"), 4, 4, [200, 100, 50]);
        save(&root.join("train/cat/x.PNG"), 4, 4, [1, 2, 3]);
        std::fs::write(root.join("train/cat/notes.txt"), "ignored").unwrap();
        save(&root.join("val/dog/c.png"), 4, 4, [9, 9, 9]);
        assert_eq!(class_names(root).unwrap(), ["cat", "dog"]);
        let (train, test) = read_image_folder(root, 3, 4).unwrap();
        assert_eq!(train.images.size(), [3, 3, 4, 4]);
        assert_eq!(train.num_classes, 2);
        // Sorted paths: cat/x.PNG, dog/a.jpg, dog/b.png.
        assert_eq!(train.label_vec(), [0, 1, 1]);
        assert_eq!(test.label_vec(), [1]);
        // A flat colour survives resizing; channel-major layout.
        for (c, v) in [1, 2, 3].into_iter().enumerate() {
            assert_eq!(train.images.int64_value(&[0, c as i64, 3, 3]), v);
        }
        for (c, v) in [10, 20, 30].into_iter().enumerate() {
            assert_eq!(train.images.int64_value(&[2, c as i64, 0, 0]), v);
        }
        // JPEG is lossy: a flat colour comes back within a few levels.
        assert!((train.images.int64_value(&[1, 0, 1, 1]) - 200).abs() <= 3);
        let (grey, _) = read_image_folder(root, 1, 2).unwrap();
        assert_eq!(grey.images.size(), [3, 1, 2, 2]);
        // BT.601 luma of (10, 20, 30).
        assert!((grey.images.int64_value(&[2, 0, 1, 1]) - 18).abs() <= 1);
    }

    #[test]
    fn data_image_folder_errors_name_the_folder_or_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let msg = |root: &Path| format!("{:#}", read_image_folder(root, 3, 4).unwrap_err());
        assert!(msg(root).contains("train/<class>"), "{}", msg(root));
        save(&root.join("train/a/1.png"), 2, 2, [0, 0, 0]);
        assert!(
            msg(root).contains("neither a test nor a val"),
            "{}",
            msg(root)
        );
        save(&root.join("test/b/1.png"), 2, 2, [0, 0, 0]);
        let m = msg(root);
        assert!(
            m.contains("test/b is a class the training split does not have"),
            "{m}"
        );
        std::fs::remove_dir_all(root.join("test/b")).unwrap();
        std::fs::create_dir_all(root.join("test/a")).unwrap();
        let m = msg(root);
        assert!(m.contains("test/a holds no .png or .jpg images"), "{m}");
        std::fs::write(root.join("test/a/broken.png"), b"\x89PNG not really").unwrap();
        let m = msg(root);
        assert!(
            m.contains("cannot decode") && m.contains("broken.png"),
            "{m}"
        );
    }
}
