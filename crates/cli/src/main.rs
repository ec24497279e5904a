//! `tensorbus`: the command-line tool.

mod bench;
mod plan_cmd;
mod workload;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "tensorbus", version, about = "Move sharded tensors between independently launched process groups")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Plan a resharding between two layouts and print the plan and its statistics.
    Plan(plan_cmd::PlanArgs),
    /// Run benchmarks and write a results table.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Planner time for the 8B-class and 1T-class workloads.
    Planner {
        /// Timed repetitions per row (the median is reported).
        #[arg(long, default_value_t = 5)]
        iters: usize,
        /// Directory to write planner.md and planner.json into.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Plan(args) => plan_cmd::run(&args),
        Cmd::Bench { what: BenchWhat::Planner { iters, out } } => {
            let rows = bench::planner(iters.max(1));
            let md = bench::planner_markdown(&rows);
            print!("{md}");
            match out {
                Some(dir) => std::fs::create_dir_all(&dir)
                    .and_then(|_| std::fs::write(dir.join("planner.md"), &md))
                    .and_then(|_| std::fs::write(dir.join("planner.json"), bench::planner_json(&rows)))
                    .map_err(|e| format!("writing results to {}: {e}", dir.display())),
                None => Ok(()),
            }
        }
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
