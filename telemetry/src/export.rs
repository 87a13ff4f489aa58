//! `flotilla trace export`: a trace as a table, one row per event, for notebooks.
//!
//! Columns (CSV and Parquet alike): `t_ns`, `kind`, `node`, `vcpu`, `page`, `access`,
//! `rip`, `peer`, `replicas`, `decision`, `service_ns`, `forced`, `had_replica`,
//! `decoded`. `kind`, `access` and `decision` are names; `vcpu`, `peer` and `replicas`
//! are -1 where not applicable; the three flags are 0 or 1.

use crate::trace::{flags, Event, Trace, NONE16};
use std::io::Write;

pub const COLUMNS: [&str; 14] = [
    "t_ns",
    "kind",
    "node",
    "vcpu",
    "page",
    "access",
    "rip",
    "peer",
    "replicas",
    "decision",
    "service_ns",
    "forced",
    "had_replica",
    "decoded",
];

fn opt(v: u16) -> i32 {
    if v == NONE16 {
        -1
    } else {
        v as i32
    }
}

#[cfg(feature = "parquet")]
fn flag(x: &Event, f: u8) -> i32 {
    (x.flags & f != 0) as i32
}

fn kind_name(e: &Event) -> &'static str {
    e.kind().map_or("?", |k| k.name())
}

/// Writes the trace as CSV with a header row.
pub fn write_csv(t: &Trace, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "{}", COLUMNS.join(","))?;
    for e in &t.events {
        writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
            e.t_ns,
            kind_name(e),
            e.node,
            opt(e.vcpu),
            e.page,
            e.access_name(),
            e.rip,
            opt(e.peer),
            opt(e.replicas),
            e.decision_name(),
            e.service_ns,
            (e.flags & flags::FORCED != 0) as u8,
            (e.flags & flags::HAD_REPLICA != 0) as u8,
            (e.flags & flags::DECODED != 0) as u8,
        )?;
    }
    out.flush()
}

/// Writes the trace as a Parquet file (Snappy-compressed row groups of up to 1 M rows),
/// with the run's metadata as key-value metadata.
#[cfg(feature = "parquet")]
pub fn write_parquet(t: &Trace, file: std::fs::File) -> Result<(), String> {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType, Int32Type, Int64Type};
    use parquet::file::metadata::KeyValue;
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::sync::Arc;

    let e = |e: parquet::errors::ParquetError| format!("writing parquet: {e}");
    let schema = parse_message_type(
        "message flotilla_trace {
            REQUIRED INT64 t_ns;
            REQUIRED BYTE_ARRAY kind (UTF8);
            REQUIRED INT32 node;
            REQUIRED INT32 vcpu;
            REQUIRED INT64 page;
            REQUIRED BYTE_ARRAY access (UTF8);
            REQUIRED INT64 rip;
            REQUIRED INT32 peer;
            REQUIRED INT32 replicas;
            REQUIRED BYTE_ARRAY decision (UTF8);
            REQUIRED INT64 service_ns;
            REQUIRED INT32 forced;
            REQUIRED INT32 had_replica;
            REQUIRED INT32 decoded;
        }",
    )
    .map_err(e)?;
    let m = &t.meta;
    let kv = |k: &str, v: String| KeyValue::new(k.to_string(), v);
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_key_value_metadata(Some(vec![
            kv("workload", m.workload.clone()),
            kv("args", m.args.clone()),
            kv("policy", m.policy.clone()),
            kv("transport", m.transport.clone()),
            kv("nodes", m.nodes.to_string()),
            kv("vcpus", m.vcpus.to_string()),
            kv("engine_version", m.engine_version.clone()),
            kv("host", m.host.clone()),
            kv("sample_rate", m.sample_rate.to_string()),
        ]))
        .build();
    let mut w = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props)).map_err(e)?;
    for chunk in t.events.chunks(1 << 20) {
        let mut rg = w.next_row_group().map_err(e)?;
        let mut index = 0;
        while let Some(mut col) = rg.next_column().map_err(e)? {
            let i64s = |f: fn(&Event) -> i64| chunk.iter().map(f).collect::<Vec<i64>>();
            let i32s = |f: fn(&Event) -> i32| chunk.iter().map(f).collect::<Vec<i32>>();
            let strs = |f: fn(&Event) -> &'static str| {
                chunk
                    .iter()
                    .map(|x| ByteArray::from(f(x)))
                    .collect::<Vec<ByteArray>>()
            };
            match index {
                0 => col
                    .typed::<Int64Type>()
                    .write_batch(&i64s(|x| x.t_ns as i64), None, None),
                1 => col
                    .typed::<ByteArrayType>()
                    .write_batch(&strs(kind_name), None, None),
                2 => col
                    .typed::<Int32Type>()
                    .write_batch(&i32s(|x| x.node as i32), None, None),
                3 => col
                    .typed::<Int32Type>()
                    .write_batch(&i32s(|x| opt(x.vcpu)), None, None),
                4 => col
                    .typed::<Int64Type>()
                    .write_batch(&i64s(|x| x.page as i64), None, None),
                5 => {
                    col.typed::<ByteArrayType>()
                        .write_batch(&strs(|x| x.access_name()), None, None)
                }
                6 => col
                    .typed::<Int64Type>()
                    .write_batch(&i64s(|x| x.rip as i64), None, None),
                7 => col
                    .typed::<Int32Type>()
                    .write_batch(&i32s(|x| opt(x.peer)), None, None),
                8 => col
                    .typed::<Int32Type>()
                    .write_batch(&i32s(|x| opt(x.replicas)), None, None),
                9 => col.typed::<ByteArrayType>().write_batch(
                    &strs(|x| x.decision_name()),
                    None,
                    None,
                ),
                10 => {
                    col.typed::<Int64Type>()
                        .write_batch(&i64s(|x| x.service_ns as i64), None, None)
                }
                11 => col.typed::<Int32Type>().write_batch(
                    &i32s(|x| flag(x, flags::FORCED)),
                    None,
                    None,
                ),
                12 => col.typed::<Int32Type>().write_batch(
                    &i32s(|x| flag(x, flags::HAD_REPLICA)),
                    None,
                    None,
                ),
                _ => col.typed::<Int32Type>().write_batch(
                    &i32s(|x| flag(x, flags::DECODED)),
                    None,
                    None,
                ),
            }
            .map_err(e)?;
            col.close().map_err(e)?;
            index += 1;
        }
        rg.close().map_err(e)?;
    }
    w.close().map_err(e)?;
    Ok(())
}

/// One column of a table for [`write_table_parquet`].
#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    I64(Vec<i64>),
    F32(Vec<f32>),
    Str(Vec<String>),
}

impl Column {
    /// Rows in the column.
    pub fn len(&self) -> usize {
        match self {
            Column::I64(v) => v.len(),
            Column::F32(v) => v.len(),
            Column::Str(v) => v.len(),
        }
    }

    /// True when the column has no rows.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Writes named columns of equal length as one Parquet file (Snappy, row groups of up
/// to 1 M rows), with `metadata` as key-value metadata: the labels of `flotilla replay
/// --labels`, and any other table the lab writes.
#[cfg(feature = "parquet")]
pub fn write_table_parquet(
    file: std::fs::File,
    columns: &[(&str, Column)],
    metadata: &[(&str, String)],
) -> Result<(), String> {
    use parquet::basic::{Compression, ConvertedType, Repetition, Type as Physical};
    use parquet::data_type::{ByteArray, ByteArrayType, FloatType, Int64Type};
    use parquet::file::metadata::KeyValue;
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::types::Type;
    use std::sync::Arc;

    let e = |e: parquet::errors::ParquetError| format!("writing parquet: {e}");
    let rows = columns.first().map_or(0, |(_, c)| c.len());
    if let Some((name, _)) = columns.iter().find(|(_, c)| c.len() != rows) {
        return Err(format!(
            "column {name} is not {rows} rows long like the first"
        ));
    }
    let fields = columns
        .iter()
        .map(|(name, c)| {
            let b = match c {
                Column::I64(_) => Type::primitive_type_builder(name, Physical::INT64),
                Column::F32(_) => Type::primitive_type_builder(name, Physical::FLOAT),
                Column::Str(_) => Type::primitive_type_builder(name, Physical::BYTE_ARRAY)
                    .with_converted_type(ConvertedType::UTF8),
            };
            b.with_repetition(Repetition::REQUIRED)
                .build()
                .map(Arc::new)
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(e)?;
    let schema = Type::group_type_builder("flotilla_table")
        .with_fields(fields)
        .build()
        .map_err(e)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_key_value_metadata(Some(
            metadata
                .iter()
                .map(|(k, v)| KeyValue::new(k.to_string(), v.clone()))
                .collect(),
        ))
        .build();
    let mut w = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props)).map_err(e)?;
    const GROUP: usize = 1 << 20;
    for start in (0..rows.max(1)).step_by(GROUP) {
        let range = start..(start + GROUP).min(rows);
        let mut rg = w.next_row_group().map_err(e)?;
        for (_, c) in columns {
            let mut col = rg
                .next_column()
                .map_err(e)?
                .ok_or("parquet writer ran out of columns")?;
            match c {
                Column::I64(v) => {
                    col.typed::<Int64Type>()
                        .write_batch(&v[range.clone()], None, None)
                }
                Column::F32(v) => {
                    col.typed::<FloatType>()
                        .write_batch(&v[range.clone()], None, None)
                }
                Column::Str(v) => col.typed::<ByteArrayType>().write_batch(
                    &v[range.clone()]
                        .iter()
                        .map(|s| ByteArray::from(s.as_str()))
                        .collect::<Vec<_>>(),
                    None,
                    None,
                ),
            }
            .map_err(e)?;
            col.close().map_err(e)?;
        }
        rg.close().map_err(e)?;
    }
    w.close().map_err(e)?;
    Ok(())
}

/// A table read back by [`read_table_parquet`]: its columns in file order and its
/// key-value metadata.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Table {
    pub columns: Vec<(String, Column)>,
    pub metadata: Vec<(String, String)>,
    pub rows: usize,
}

impl Table {
    /// The column called `name`.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    /// The metadata value of `key`.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads a flat table as [`write_table_parquet`] writes it (required INT64, FLOAT and UTF-8
/// BYTE_ARRAY columns), for training on `flotilla replay --labels` files. Anything else
/// (nested or optional columns, other types, invalid UTF-8, a file that is not Parquet) is
/// an error naming the problem.
#[cfg(feature = "parquet")]
pub fn read_table_parquet(file: std::fs::File) -> Result<Table, String> {
    use parquet::basic::Repetition;
    use parquet::column::reader::ColumnReader;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    let e = |e: parquet::errors::ParquetError| format!("reading parquet: {e}");
    let reader = SerializedFileReader::new(file).map_err(e)?;
    let meta = reader.metadata();
    let file_meta = meta.file_metadata();
    let schema = file_meta.schema_descr();
    let mut columns: Vec<(String, Column)> = Vec::new();
    for c in schema.columns() {
        let name = c.name().to_string();
        if c.max_rep_level() != 0
            || c.max_def_level() != 0
            || c.self_type().get_basic_info().repetition() != Repetition::REQUIRED
        {
            return Err(format!("column {name}: not a flat required column"));
        }
        let col = match c.physical_type() {
            parquet::basic::Type::INT64 => Column::I64(Vec::new()),
            parquet::basic::Type::FLOAT => Column::F32(Vec::new()),
            parquet::basic::Type::BYTE_ARRAY => Column::Str(Vec::new()),
            other => {
                return Err(format!(
                    "column {name}: type {other} is not INT64, FLOAT or UTF-8"
                ))
            }
        };
        columns.push((name, col));
    }
    let rows = usize::try_from(file_meta.num_rows())
        .map_err(|_| "reading parquet: negative row count".to_string())?;
    for g in 0..reader.num_row_groups() {
        let group = reader.get_row_group(g).map_err(e)?;
        let n = usize::try_from(group.metadata().num_rows()).unwrap_or(0);
        for (j, (name, col)) in columns.iter_mut().enumerate() {
            let bad =
                |got: usize| format!("column {name}: row group {g} holds {got} of {n} values");
            let got = match (group.get_column_reader(j).map_err(e)?, col) {
                (ColumnReader::Int64ColumnReader(mut r), Column::I64(v)) => {
                    r.read_records(n, None, None, v).map_err(e)?.0
                }
                (ColumnReader::FloatColumnReader(mut r), Column::F32(v)) => {
                    r.read_records(n, None, None, v).map_err(e)?.0
                }
                (ColumnReader::ByteArrayColumnReader(mut r), Column::Str(v)) => {
                    let mut raw = Vec::with_capacity(n);
                    let got = r.read_records(n, None, None, &mut raw).map_err(e)?.0;
                    for b in raw {
                        let s = std::str::from_utf8(b.data())
                            .map_err(|_| format!("column {name}: a value is not UTF-8"))?;
                        v.push(s.to_string());
                    }
                    got
                }
                _ => return Err(format!("column {name}: reader of another type")),
            };
            if got != n {
                return Err(bad(got));
            }
        }
    }
    if let Some((name, _)) = columns.iter().find(|(_, c)| c.len() != rows) {
        return Err(format!("column {name}: not {rows} rows long"));
    }
    let metadata = file_meta
        .key_value_metadata()
        .map(|kv| {
            kv.iter()
                .map(|k| (k.key.clone(), k.value.clone().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    Ok(Table {
        columns,
        metadata,
        rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{EventKind, TraceMeta};

    #[test]
    fn csv_has_one_row_per_event() {
        let t = Trace {
            meta: TraceMeta {
                nodes: 2,
                vcpus: 2,
                ..Default::default()
            },
            events: vec![Event {
                t_ns: 5,
                page: 0x400,
                rip: 0x1234,
                service_ns: 77,
                vcpu: 1,
                node: 0,
                peer: 1,
                replicas: NONE16,
                kind: EventKind::RemoteFault as u8,
                access: 1,
                decision: 2,
                flags: flags::FORCED,
            }],
        };
        let mut out = Vec::new();
        write_csv(&t, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[1],
            "5,remote_fault,0,1,1024,write,4660,1,-1,move_vcpu,77,1,0,0"
        );
    }

    #[cfg(feature = "parquet")]
    #[test]
    fn a_table_reads_back_as_written_and_a_bad_file_is_an_error() {
        let dir = std::env::temp_dir().join(format!("flotilla-table-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.parquet");
        let columns = [
            ("a", Column::I64(vec![1, -2, 3])),
            ("b", Column::F32(vec![0.5, 1.5, -2.0])),
            ("c", Column::Str(vec!["x".into(), "".into(), "zz".into()])),
        ];
        let meta = [("feature_version", "1".to_string())];
        write_table_parquet(std::fs::File::create(&path).unwrap(), &columns, &meta).unwrap();
        let t = read_table_parquet(std::fs::File::open(&path).unwrap()).unwrap();
        assert_eq!(t.rows, 3);
        assert_eq!(t.meta("feature_version"), Some("1"));
        for (name, c) in &columns {
            assert_eq!(t.column(name), Some(c), "{name}");
        }
        std::fs::write(&path, b"PAR1 not really").unwrap();
        let err = read_table_parquet(std::fs::File::open(&path).unwrap()).unwrap_err();
        assert!(err.contains("parquet"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
