//! The `strait-cni` binary: a CNI plugin when the runtime runs it (`CNI_COMMAND` set), else
//! `strait-cni install|uninstall`.

use std::io::{Read as _, Write as _};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if std::env::var_os("CNI_COMMAND").is_none()
        && let Some(command) = args.first()
    {
        return match strait_cni::install::main(command, &args[1..]) {
            Ok(message) => {
                println!("{message}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("strait-cni {command}: {error}");
                ExitCode::FAILURE
            }
        };
    }
    let mut stdin = Vec::new();
    // VERSION may come with an empty stdin; a read error shows up as a decode error.
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let output = strait_cni::plugin::run(&|name| std::env::var(name).ok(), &stdin);
    let _ = std::io::stderr().write_all(output.stderr.as_bytes());
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(output.stdout.as_bytes());
    let _ = stdout.flush();
    ExitCode::from(output.code as u8)
}
