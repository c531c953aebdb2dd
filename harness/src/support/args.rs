//! The command line both harnesses take: `--name VALUE` or `--name=VALUE`, flags alone, and
//! the options they share (`--quick`, `--out DIR`, `-h`/`--help`).

use std::path::PathBuf;

/// The options both harnesses take.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Common {
    /// `--quick`.
    pub quick: bool,
    /// `--out`, if given.
    pub out: Option<PathBuf>,
    /// `--help` or `-h`.
    pub help: bool,
}

/// One argument: its name and, in the `--name=VALUE` form, its value.
pub struct Arg {
    /// `--out`, `-h`, or anything else that was given.
    pub name: String,
    /// `VALUE` of `--name=VALUE`.
    pub inline: Option<String>,
}

/// The arguments not read yet.
pub struct Args {
    rest: std::vec::IntoIter<String>,
}

impl Args {
    /// The value of `arg`: its `=VALUE`, or else the next argument; `what` names what is
    /// missing in the error.
    pub fn value(&mut self, arg: &Arg, what: &str) -> Result<String, String> {
        arg.inline
            .clone()
            .or_else(|| self.rest.next())
            .ok_or_else(|| format!("{} needs a value ({what})", arg.name))
    }

    fn next_arg(&mut self) -> Option<Arg> {
        let arg = self.rest.next()?;
        Some(match arg.split_once('=') {
            Some((name, value)) if name.starts_with("--") => Arg {
                name: name.to_string(),
                inline: Some(value.to_string()),
            },
            _ => Arg {
                name: arg,
                inline: None,
            },
        })
    }
}

/// Parses the arguments after the program name, in order: the [`Common`] ones here, every
/// other one by `other` (which reads its value from the [`Args`] it is given, and refuses what
/// it does not know with [`unknown`]). The first error ends the parse.
pub fn parse(
    args: impl IntoIterator<Item = String>,
    mut other: impl FnMut(&Arg, &mut Args) -> Result<(), String>,
) -> Result<Common, String> {
    let mut common = Common::default();
    let mut args = Args {
        rest: args.into_iter().collect::<Vec<_>>().into_iter(),
    };
    while let Some(arg) = args.next_arg() {
        match arg.name.as_str() {
            "-h" | "--help" => common.help = true,
            "--quick" if arg.inline.is_none() => common.quick = true,
            "--out" => common.out = Some(PathBuf::from(args.value(&arg, "a directory")?)),
            _ => other(&arg, &mut args)?,
        }
    }
    Ok(common)
}

/// The error for an argument the harness does not take.
pub fn unknown(name: &str) -> String {
    format!("unknown argument {name:?}; see --help")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_list(list: &[&str]) -> Result<(Common, Vec<String>), String> {
        let mut seen = Vec::new();
        let common = parse(list.iter().map(|a| a.to_string()), |arg, args| {
            match arg.name.as_str() {
                "--n" => {
                    seen.push(args.value(arg, "a number")?);
                    Ok(())
                }
                other => Err(unknown(other)),
            }
        })?;
        Ok((common, seen))
    }

    #[test]
    fn values_come_inline_or_next() {
        let (common, seen) = parse_list(&["--n=1", "--quick", "--n", "2", "--out=x"]).expect("valid");
        assert_eq!(seen, ["1", "2"]);
        assert_eq!(
            common,
            Common {
                quick: true,
                out: Some(PathBuf::from("x")),
                help: false
            }
        );
        assert!(parse_list(&["-h"]).expect("valid").0.help);
        assert_eq!(
            parse_list(&["--out"]),
            Err("--out needs a value (a directory)".into())
        );
        assert_eq!(parse_list(&["--n"]), Err("--n needs a value (a number)".into()));
        // A flag takes no value; only `--name` splits at `=`.
        assert_eq!(parse_list(&["--quick=1"]), Err(unknown("--quick")));
        assert_eq!(parse_list(&["-h=1"]), Err(unknown("-h=1")));
    }
}
