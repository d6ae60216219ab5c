//! Parses the Alibaba GPU cluster trace ("openb", cluster-trace-gpu-v2023) used by the FGD paper: the node list and
//! the pod lists. Takes the file's text and name (the caller reads the file); every error names the file, the line
//! and the field.

use kiln_core::placement::{Cluster, GpuDemand, MAX_GPUS_PER_NODE, MILLI_PER_GPU, ModelSet, NodeSpec, Request};

/// A parse error, naming where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {field}: {message}")]
pub struct TraceError {
    /// File name as given.
    pub file: String,
    /// 1-based line number (1 = header).
    pub line: usize,
    /// Column name.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

struct Csv<'a> {
    file: &'a str,
    header: Vec<&'a str>,
    rows: Vec<(usize, Vec<&'a str>)>,
}

impl<'a> Csv<'a> {
    fn parse(file: &'a str, text: &'a str, required: &[&str]) -> Result<Self, TraceError> {
        let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
        let (_, header_line) = lines.next().ok_or_else(|| TraceError {
            file: file.to_owned(),
            line: 1,
            field: "header".to_owned(),
            message: "the file is empty".to_owned(),
        })?;
        let header: Vec<&str> = header_line.split(',').map(str::trim).collect();
        for column in required {
            if !header.contains(column) {
                return Err(TraceError {
                    file: file.to_owned(),
                    line: 1,
                    field: (*column).to_owned(),
                    message: format!("missing column (header has: {})", header.join(", ")),
                });
            }
        }
        let mut rows = Vec::new();
        for (i, line) in lines {
            let cells: Vec<&str> = line.split(',').map(str::trim).collect();
            if cells.len() != header.len() {
                return Err(TraceError {
                    file: file.to_owned(),
                    line: i + 1,
                    field: "row".to_owned(),
                    message: format!("{} fields, the header has {}", cells.len(), header.len()),
                });
            }
            rows.push((i + 1, cells));
        }
        Ok(Self { file, header, rows })
    }

    fn cell<'r>(&self, row: &'r [&'a str], column: &str) -> Option<&'a str> {
        self.header.iter().position(|h| *h == column).map(|i| row[i])
    }

    fn error(&self, line: usize, field: &str, message: String) -> TraceError {
        TraceError { file: self.file.to_owned(), line, field: field.to_owned(), message }
    }

    fn number<T: std::str::FromStr>(&self, line: usize, row: &[&'a str], column: &str) -> Result<T, TraceError> {
        let raw = self.cell(row, column).unwrap_or_default();
        raw.parse().map_err(|_| self.error(line, column, format!("{raw:?} is not a non-negative integer in range")))
    }
}

/// Parses a node list (`sn,cpu_milli,memory_mib,gpu,model`).
pub fn parse_nodes(file: &str, text: &str) -> Result<Vec<NodeSpec>, TraceError> {
    let csv = Csv::parse(file, text, &["sn", "cpu_milli", "memory_mib", "gpu", "model"])?;
    let mut nodes = Vec::with_capacity(csv.rows.len());
    for (line, row) in &csv.rows {
        let gpu_count: u8 = csv.number(*line, row, "gpu")?;
        if usize::from(gpu_count) > MAX_GPUS_PER_NODE {
            return Err(csv.error(*line, "gpu", format!("{gpu_count} GPUs; at most 16 per node are supported")));
        }
        let name = csv.cell(row, "sn").unwrap_or_default();
        if name.is_empty() {
            return Err(csv.error(*line, "sn", "empty node name".to_owned()));
        }
        nodes.push(NodeSpec::new(
            name,
            csv.number(*line, row, "cpu_milli")?,
            csv.number(*line, row, "memory_mib")?,
            gpu_count,
            csv.cell(row, "model").unwrap_or_default(),
        ));
    }
    Ok(nodes)
}

/// A pod list as requests, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct PodList {
    /// Every pod of the file, those no node could ever hold included (they arrive and stay unscheduled, as in the
    /// paper's simulator).
    pub pods: Vec<Request>,
    /// The file lines of the pods no node of the cluster could ever hold (too many GPUs, CPU or memory for any node
    /// of an allowed GPU model).
    pub infeasible_lines: Vec<usize>,
}

/// Parses a pod list into requests for `cluster` (whose model names resolve `gpu_spec`). Columns:
/// `cpu_milli,memory_mib,num_gpu,gpu_milli` and optionally `gpu_spec` ('|'-separated allowed models, empty = any).
/// A malformed row is an error; a well-formed pod no node could ever hold is kept and named in
/// [`PodList::infeasible_lines`].
pub fn parse_pods(file: &str, text: &str, cluster: &Cluster) -> Result<PodList, TraceError> {
    let csv = Csv::parse(file, text, &["cpu_milli", "memory_mib", "num_gpu", "gpu_milli"])?;
    let mut pods = Vec::with_capacity(csv.rows.len());
    let mut infeasible_lines = Vec::new();
    for (line, row) in &csv.rows {
        let line = *line;
        let num_gpu: u8 = csv.number(line, row, "num_gpu")?;
        let gpu_milli: u16 = csv.number(line, row, "gpu_milli")?;
        let gpu = match (num_gpu, gpu_milli) {
            (0, 0) => GpuDemand::None,
            (0, m) => return Err(csv.error(line, "gpu_milli", format!("{m} milli-GPU but num_gpu is 0"))),
            (1, m) if m > 0 && m < MILLI_PER_GPU => GpuDemand::Share(m),
            (k, MILLI_PER_GPU) => GpuDemand::Whole(k),
            (k, m) => {
                return Err(csv.error(
                    line,
                    "gpu_milli",
                    format!("{m} with num_gpu {k}: a share is 1..999 of one GPU, several GPUs are whole (1000)"),
                ));
            }
        };
        let models = match csv.cell(row, "gpu_spec").filter(|s| !s.is_empty()) {
            None => ModelSet::ANY,
            Some(spec) => {
                let mut ids = Vec::new();
                for name in spec.split('|') {
                    let id = cluster.model_id(name).ok_or_else(|| {
                        csv.error(line, "gpu_spec", format!("GPU model {name:?} is not in the node list"))
                    })?;
                    ids.push(id);
                }
                ModelSet::of(ids)
            }
        };
        let request = Request {
            models,
            ..Request::new(csv.number(line, row, "cpu_milli")?, csv.number(line, row, "memory_mib")?, gpu)
        };
        if !cluster.could_ever_hold(&request) {
            infeasible_lines.push(line);
        }
        pods.push(request);
    }
    Ok(PodList { pods, infeasible_lines })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "sn,cpu_milli,memory_mib,gpu,model\nn0,64000,262144,2,P100\nn1,96000,786432,8,G2\n";

    fn cluster() -> Cluster {
        Cluster::new(&parse_nodes("nodes.csv", NODES).unwrap()).unwrap()
    }

    #[test]
    fn parses_nodes_and_the_three_kinds_of_pod() {
        let c = cluster();
        assert_eq!(c.len(), 2);
        assert_eq!(c.gpu_capacity_milli(), 10_000);
        let pods = parse_pods(
            "pods.csv",
            "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n\
             a,8000,1024,0,0,\nb,6000,12288,1,460,\nc,12000,16384,8,1000,G2\nd,1000,10,1,1000,P100|G2\n",
            &c,
        )
        .unwrap();
        assert!(pods.infeasible_lines.is_empty());
        let pods = pods.pods;
        assert_eq!(pods[0].gpu, GpuDemand::None);
        assert_eq!(pods[1].gpu, GpuDemand::Share(460));
        assert_eq!(pods[2].gpu, GpuDemand::Whole(8));
        assert_eq!(pods[2].models, ModelSet::of([1]));
        assert_eq!(pods[3].models, ModelSet::of([0, 1]));
    }

    #[test]
    fn errors_name_the_file_line_and_field() {
        let c = cluster();
        let header = "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n";
        let cases = [
            ("a,x,1,0,0,\n", "pods.csv:2: cpu_milli: \"x\" is not a non-negative integer"),
            ("a,1,1,2,500,\n", "pods.csv:2: gpu_milli: 500 with num_gpu 2"),
            ("a,1,1,1,500,H100\n", "pods.csv:2: gpu_spec: GPU model \"H100\" is not in the node list"),
            ("a,1,1,1,500\n", "pods.csv:2: row: 5 fields, the header has 6"),
            ("a,1,1,0,0,\nb,1,1,-1,0,\n", "pods.csv:3: num_gpu: \"-1\" is not"),
        ];
        for (rows, want) in cases {
            let err = parse_pods("pods.csv", &format!("{header}{rows}"), &c).unwrap_err().to_string();
            assert!(err.starts_with(want), "want {want:?}, got {err:?}");
        }
        // Well-formed but more than any node holds: kept, and named.
        let list =
            parse_pods("pods.csv", &format!("{header}a,1,1,1,500,\nb,1,1,16,1000,\nc,1,9999999,0,0,\n"), &c).unwrap();
        assert_eq!((list.pods.len(), list.infeasible_lines), (3, vec![3, 4]));
        let err = parse_nodes("nodes.csv", "sn,cpu_milli,memory_mib,gpu\nn0,1,1,1\n").unwrap_err();
        assert_eq!(err.to_string(), "nodes.csv:1: model: missing column (header has: sn, cpu_milli, memory_mib, gpu)");
        let err = parse_nodes("nodes.csv", "sn,cpu_milli,memory_mib,gpu,model\nn0,1,1,17,A\n").unwrap_err();
        assert!(err.to_string().starts_with("nodes.csv:2: gpu: 17 GPUs"), "{err}");
    }
}
