// Classify PNG and JPEG files with a featbank ONNX export made with `featbank export --input raw`.
//
//   npm install --ignore-scripts            # onnxruntime-node, pngjs, sharp
//   node classify.mjs model.onnx a.png b.jpg ...
//
// The raw graph resizes and centre-crops inside, so this service only decodes: PNG with pngjs, JPEG
// with sharp (libvips over libjpeg-turbo, the decoder Pillow uses: the same pixels, bit for bit, and
// the EXIF orientation applied as featbank does), to RGB uint8 (alpha dropped and grey replicated, as
// featbank does), one image per run of the graph (images of one size could share a batch).
// Prints JSON: { classes, predictions: [{ file, label, index, probability, probabilities } | { file, error }] }.
// An image that cannot be used gets its error and the others are still classified (exit 0); a model
// that is not a raw-input featbank model exits 2.
import { readFileSync } from "node:fs";
import * as ort from "onnxruntime-node";
import pngjs from "pngjs";
import sharp from "sharp";
import { readMetadata } from "./predict.mjs";

// The limits featbank applies before its resize (featbank.images): a longer side at most 100 times the
// shorter, at most 2**26 pixels once the shorter side is resized, and Pillow's decompression-bomb limit.
export const MAX_ASPECT_RATIO = 100;
export const MAX_RESIZED_PIXELS = 2 ** 26;
export const MAX_PIXELS = 178956970;

// Refuse the sizes featbank refuses (from the header, before decoding where the decoder allows).
export function checkSize(width, height, resizeSize) {
  if (!(width >= 1 && height >= 1)) throw new Error(`zero-size image (${width}x${height})`);
  if (width * height > MAX_PIXELS) throw new Error(`too many pixels: ${width}x${height} (limit ${MAX_PIXELS})`);
  const short = Math.min(width, height), long = Math.max(width, height);
  if (long > MAX_ASPECT_RATIO * short) {
    throw new Error(`extreme aspect ratio: ${width}x${height} (at most ${MAX_ASPECT_RATIO}:1 is accepted)`);
  }
  if (resizeSize * Math.floor((resizeSize * long) / short) > MAX_RESIZED_PIXELS) {
    throw new Error(`resize target too large: ${width}x${height}`);
  }
}

// Decoded RGBA (or RGB) bytes -> { data: RGB Uint8Array, width, height }, refusing what featbank refuses.
export function toRgb({ data, width, height }, channels, resizeSize) {
  checkSize(width, height, resizeSize);
  if (channels !== 3 && channels !== 4) throw new Error(`expected 3 or 4 channels, got ${channels}`);
  if (data.length !== width * height * channels) throw new Error("decoded size does not match the header");
  const rgb = new Uint8Array(width * height * 3);
  for (let i = 0, j = 0; i < width * height; i++, j += channels) {
    rgb[3 * i] = data[j];
    rgb[3 * i + 1] = data[j + 1];
    rgb[3 * i + 2] = data[j + 2];
  }
  return { data: rgb, width, height };
}

export async function decodeImage(file, resizeSize) {
  const buf = readFileSync(file);
  if (buf.length >= 8 && buf.readUInt32BE(0) === 0x89504e47) {
    // pngjs expands palette, grey and 16-bit images to 8-bit RGBA.
    const png = pngjs.PNG.sync.read(buf);
    return toRgb(png, 4, resizeSize);
  }
  if (buf.length >= 3 && buf[0] === 0xff && buf[1] === 0xd8 && buf[2] === 0xff) {
    const jpeg = sharp(buf, { limitInputPixels: MAX_PIXELS });
    const { width, height } = await jpeg.metadata();  // the header only: sizes are refused before decoding
    checkSize(width, height, resizeSize);
    const { data, info } = await jpeg.rotate().removeAlpha().toColourspace("srgb").raw()
      .toBuffer({ resolveWithObject: true });
    return toRgb({ data, width: info.width, height: info.height }, info.channels, resizeSize);
  }
  throw new Error("not a PNG or JPEG file");
}

export async function classify(modelPath, files) {
  const meta = readMetadata(readFileSync(modelPath));
  if (meta.featbank_onnx !== "1") throw new Error(`${modelPath} is not a featbank ONNX model (no featbank_onnx metadata)`);
  if (meta.input !== "raw") {
    throw new Error(`${modelPath} takes ${meta.input ?? "preprocessed"} input; export it with --input raw ` +
                    "(or feed resized pixels with predict.mjs)");
  }
  const classes = JSON.parse(meta.classes);
  const resizeSize = JSON.parse(meta.preprocessing).resize_size;
  const session = await ort.InferenceSession.create(modelPath);
  const predictions = [];
  for (const file of files) {
    let img;
    try {
      img = await decodeImage(file, resizeSize);
    } catch (e) {
      predictions.push({ file, error: `cannot use ${file}: ${e.message}` });
      continue;
    }
    const input = new ort.Tensor("uint8", img.data, [1, img.height, img.width, 3]);
    const out = await session.run({ images: input });
    const probabilities = Array.from(out.probabilities.data);
    const index = Number(out.label.data[0]);
    predictions.push({ file, label: classes[index], index, probability: probabilities[index], probabilities });
  }
  return { classes, backbone: meta.backbone, predictions };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const [modelPath, ...files] = process.argv.slice(2);
  if (!modelPath || files.length === 0) {
    console.error("usage: node classify.mjs MODEL.onnx IMAGE.png|IMAGE.jpg ...");
    process.exit(2);
  }
  classify(modelPath, files).then(
    (r) => console.log(JSON.stringify(r)),
    (e) => { console.error(`Error: ${e.message}`); process.exit(2); },
  );
}
