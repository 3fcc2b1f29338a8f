// Classify images with a featbank ONNX export in Node.js (onnxruntime-node only).
//
//   npm install --ignore-scripts onnxruntime-node
//   node predict.mjs model.onnx batch.npy            # uint8 (N, H, W, 3), from Python (see docs/formats.md)
//   node predict.mjs model.onnx a.rgb b.rgb          # raw H*W*3 RGB bytes, one image per file
//
// The pixels must already be resized and centre-cropped as metadata.preprocessing says
// (resize_size, input_size, interpolation); normalisation is inside the graph.
// Prints JSON: { classes, predictions: [{ label, index, probability, probabilities }] }.
import { readFileSync } from "node:fs";
import * as ort from "onnxruntime-node";

// onnxruntime-node does not expose an ONNX file's metadata_props, so read them from the protobuf:
// ModelProto field 14 = StringStringEntryProto { 1: key, 2: value }.
export function readMetadata(buf) {
  let pos = 0;
  const varint = (b) => {
    let result = 0, mul = 1, byte;
    do { byte = b[pos++]; result += (byte & 0x7f) * mul; mul *= 128; } while (byte & 0x80);
    return result;
  };
  const entry = (b) => {
    const kv = {};
    const len = varint(b);
    for (const end = pos + len; pos < end; ) {
      const tag = varint(b), len = varint(b);
      kv[tag >> 3] = new TextDecoder().decode(b.subarray(pos, pos + len));
      pos += len;
    }
    return kv;
  };
  const meta = {};
  while (pos < buf.length) {
    const tag = varint(buf), field = Math.floor(tag / 8), wire = tag & 7;
    if (wire === 0) varint(buf);
    else if (wire === 1) pos += 8;
    else if (wire === 5) pos += 4;
    else if (wire === 2) {
      if (field === 14) { const kv = entry(buf); meta[kv[1]] = kv[2] ?? ""; }
      else { const len = varint(buf); pos += len; } // not `pos += varint()`: that reads pos first
    } else throw new Error(`unexpected protobuf wire type ${wire}: not an ONNX file?`);
  }
  return meta;
}

function readNpyUint8(buf) {
  if (buf.toString("latin1", 1, 6) !== "NUMPY") throw new Error("not a .npy file");
  const major = buf[6];
  const offset = major === 1 ? 10 : 12;
  const headerLen = major === 1 ? buf.readUInt16LE(8) : buf.readUInt32LE(8);
  const header = buf.toString("latin1", offset, offset + headerLen);
  if (!/'descr':\s*'\|u1'/.test(header) || /'fortran_order':\s*True/.test(header)) {
    throw new Error(".npy must hold C-ordered uint8 pixels (numpy.save of an (N, H, W, 3) uint8 array)");
  }
  const shape = header.match(/'shape':\s*\(([^)]*)\)/)[1].split(",").filter((s) => s.trim()).map(Number);
  const start = offset + headerLen;
  return { data: new Uint8Array(buf.buffer, buf.byteOffset + start, buf.length - start), shape };
}

export async function predict(modelPath, inputs) {
  const meta = readMetadata(readFileSync(modelPath));
  if (meta.featbank_onnx !== "1") throw new Error(`${modelPath} is not a featbank ONNX model (no featbank_onnx metadata)`);
  const classes = JSON.parse(meta.classes);
  const [h, w] = JSON.parse(meta.preprocessing).input_size;
  let data, n;
  if (inputs.length === 1 && inputs[0].endsWith(".npy")) {
    const npy = readNpyUint8(readFileSync(inputs[0]));
    if (npy.shape.length !== 4 || npy.shape[1] !== h || npy.shape[2] !== w || npy.shape[3] !== 3) {
      throw new Error(`expected pixels of shape (N, ${h}, ${w}, 3), got (${npy.shape})`);
    }
    [data, n] = [npy.data, npy.shape[0]];
  } else {
    n = inputs.length;
    data = new Uint8Array(n * h * w * 3);
    inputs.forEach((f, i) => {
      const raw = readFileSync(f);
      if (raw.length !== h * w * 3) throw new Error(`${f}: expected ${h}x${w}x3 = ${h * w * 3} bytes, got ${raw.length}`);
      data.set(raw, i * h * w * 3);
    });
  }
  const session = await ort.InferenceSession.create(modelPath);
  const out = await session.run({ images: new ort.Tensor("uint8", data, [n, h, w, 3]) });
  const probs = out.probabilities.data, labels = out.label.data, c = classes.length;
  const predictions = [];
  for (let i = 0; i < n; i++) {
    const row = Array.from(probs.subarray(i * c, (i + 1) * c));
    const index = Number(labels[i]);
    predictions.push({ label: classes[index], index, probability: row[index], probabilities: row });
  }
  return { classes, backbone: meta.backbone, predictions };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const [modelPath, ...inputs] = process.argv.slice(2);
  if (!modelPath || inputs.length === 0) {
    console.error("usage: node predict.mjs MODEL.onnx (BATCH.npy | IMAGE.rgb ...)");
    process.exit(2);
  }
  predict(modelPath, inputs).then(
    (r) => console.log(JSON.stringify(r)),
    (e) => { console.error(`Error: ${e.message}`); process.exit(2); },
  );
}
