use std::ffi::{OsStr, OsString};
use std::iter::once;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use clap::Parser;

use super::*;

fn parse_back(cfg: &VmmConfig) -> Result<VmmConfig, clap::Error> {
    VmmConfig::try_parse_from(once(OsString::from(VMM_BINARY)).chain(cfg.to_args()))
}

fn everything_set() -> VmmConfig {
    VmmConfig {
        kernel: "/var/lib/husk/vmlinux".into(),
        initrd: Some("/var/lib/husk/initrd.cpio.gz".into()),
        cmdline: "quiet husk.log=debug init=/init -- a=b".into(),
        vcpus: 4,
        memory_mib: 1024,
        console: "/run/husk/c1/console.log".into(),
        console_max_bytes: 4096,
        block: vec![
            BlockSpec {
                path: "/images/root.img".into(),
                read_only: true,
            },
            BlockSpec {
                path: "/images/scratch,1.img".into(),
                read_only: false,
            },
        ],
        vsock_uds: Some("/run/husk/c1/vsock.sock".into()),
        guest_cid: Some(42),
        fs: vec![
            FsSpec::new("/run/husk/c1/rootfs", "rootfs").unwrap(),
            FsSpec::new("/srv/data dir", "data=1").unwrap(),
        ],
        no_rng: true,
        allow_emulated_kvm: true,
        no_jail: true,
        seccomp_log: true,
    }
}

#[test]
fn default_config_round_trips() {
    let cfg = VmmConfig::new("/boot/vmlinux".into());
    assert_eq!(parse_back(&cfg).unwrap(), cfg);
}

#[test]
fn new_matches_the_command_line_defaults() {
    let parsed = VmmConfig::try_parse_from(["husk-vmm", "--kernel", "/boot/vmlinux"]).unwrap();
    assert_eq!(parsed, VmmConfig::new("/boot/vmlinux".into()));
}

#[test]
fn config_with_everything_set_round_trips() {
    let cfg = everything_set();
    assert_eq!(parse_back(&cfg).unwrap(), cfg);
}

#[test]
fn values_starting_with_a_dash_round_trip() {
    let mut cfg = VmmConfig::new("-vmlinux".into());
    cfg.cmdline = "--help".into();
    cfg.console = "-console".into();
    assert_eq!(parse_back(&cfg).unwrap(), cfg);
}

#[test]
fn non_utf8_paths_round_trip() {
    let odd = PathBuf::from(OsStr::from_bytes(b"/images/\xff.img"));
    let mut cfg = VmmConfig::new(odd.clone());
    cfg.block.push(BlockSpec {
        path: odd.clone(),
        read_only: true,
    });
    cfg.fs.push(FsSpec::new(odd, "t").unwrap());
    assert_eq!(parse_back(&cfg).unwrap(), cfg);
}

#[test]
fn args_are_explicit_and_in_a_fixed_order() {
    let args = everything_set().to_args();
    let names: Vec<String> = args
        .iter()
        .map(|a| {
            let a = a.to_string_lossy();
            a.split('=').next().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        names,
        [
            "--kernel",
            "--initrd",
            "--cmdline",
            "--vcpus",
            "--memory-mib",
            "--console",
            "--console-max-bytes",
            "--block",
            "--block",
            "--vsock-uds",
            "--guest-cid",
            "--fs",
            "--fs",
            "--no-rng",
            "--allow-emulated-kvm",
            "--no-jail",
            "--seccomp-log",
        ]
    );
    assert_eq!(args[2], "--cmdline=quiet husk.log=debug init=/init -- a=b");
    assert_eq!(args[8], "--block=/images/scratch,1.img,rw");
}

#[test]
fn vsock_uds_without_guest_cid_is_refused() {
    let err = VmmConfig::try_parse_from([
        "husk-vmm",
        "--kernel",
        "/boot/vmlinux",
        "--vsock-uds",
        "/run/v.sock",
    ])
    .unwrap_err();
    assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
    assert!(err.to_string().contains("--guest-cid"), "{err}");
}

#[test]
fn guest_cid_without_vsock_uds_is_refused() {
    let err =
        VmmConfig::try_parse_from(["husk-vmm", "--kernel", "/boot/vmlinux", "--guest-cid", "3"])
            .unwrap_err();
    assert_eq!(err.kind(), clap::error::ErrorKind::MissingRequiredArgument);
}

#[test]
fn bad_block_value_is_refused_with_its_reason() {
    let err =
        VmmConfig::try_parse_from(["husk-vmm", "--kernel", "k", "--block", "a,b.img"]).unwrap_err();
    assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
    assert!(
        err.to_string()
            .contains("unknown block option \"b.img\" (expected ro or rw)"),
        "{err}"
    );
}

#[test]
fn block_spec_parses_the_options() {
    assert_eq!(
        "disk.img,ro".parse::<BlockSpec>().unwrap(),
        BlockSpec {
            path: "disk.img".into(),
            read_only: true
        }
    );
    assert!(!"disk.img".parse::<BlockSpec>().unwrap().read_only);
    assert!(!"disk.img,rw".parse::<BlockSpec>().unwrap().read_only);
    assert_eq!(
        "a,b.img".parse::<BlockSpec>(),
        Err(SpecError::BlockOption("b.img".into()))
    );
    assert_eq!(",ro".parse::<BlockSpec>(), Err(SpecError::EmptyBlockPath));
    assert_eq!("".parse::<BlockSpec>(), Err(SpecError::EmptyBlockPath));
}

#[test]
fn block_spec_display_round_trips() {
    for (text, shown) in [
        ("disk.img", "disk.img"),
        ("disk.img,ro", "disk.img,ro"),
        ("disk.img,rw", "disk.img"),
        ("a,b.img,rw", "a,b.img,rw"),
        ("a,b.img,ro", "a,b.img,ro"),
        ("a,ro,rw", "a,ro,rw"),
    ] {
        let spec: BlockSpec = text.parse().unwrap();
        assert_eq!(spec.to_string(), shown);
        assert_eq!(spec.to_string().parse::<BlockSpec>().unwrap(), spec);
    }
}

#[test]
fn fs_spec_parses_path_and_tag() {
    assert_eq!(
        "/srv/share,tag=husk-shared".parse::<FsSpec>().unwrap(),
        FsSpec {
            path: "/srv/share".into(),
            tag: "husk-shared".into()
        }
    );
    assert_eq!(
        format!("/d,tag={}", "x".repeat(36))
            .parse::<FsSpec>()
            .unwrap()
            .tag,
        "x".repeat(36)
    );
}

#[test]
fn fs_spec_display_round_trips() {
    let spec = FsSpec::new("/srv/a dir", "tag=odd").unwrap();
    assert_eq!(spec.to_string(), "/srv/a dir,tag=tag=odd");
    assert_eq!(spec.to_string().parse::<FsSpec>().unwrap(), spec);
}

#[test]
fn fs_spec_refuses_bad_syntax_and_tags_with_husk_vmm_texts() {
    let cases = [
        ("/d", "\"/d\": expected PATH,tag=TAG"),
        ("/d,ro", "unknown virtio-fs option \"ro\" (expected tag=TAG)"),
        ("/d,tag=", "the virtio-fs tag is empty"),
        (",tag=t", "empty shared directory path"),
        (
            "/d,tag=has space",
            "the virtio-fs tag \"has space\" contains ' '; only printable ASCII without ',' or spaces is allowed",
        ),
        (
            "/d,tag=caf\u{e9}",
            "the virtio-fs tag \"caf\u{e9}\" contains '\u{e9}'; only printable ASCII without ',' or spaces is allowed",
        ),
    ];
    for (text, message) in cases {
        let err = text.parse::<FsSpec>().unwrap_err();
        assert_eq!(err.to_string(), message, "{text:?}");
    }
    let long = "x".repeat(37);
    assert_eq!(
        format!("/d,tag={long}")
            .parse::<FsSpec>()
            .unwrap_err()
            .to_string(),
        format!("the virtio-fs tag \"{long}\" is 37 bytes long; at most 36 are allowed")
    );
}

#[test]
fn non_utf8_tag_is_refused() {
    let err = FsSpec::try_from(OsStr::from_bytes(b"/d,tag=\xff")).unwrap_err();
    assert!(
        matches!(err, SpecError::Tag(TagError::BadChar { .. })),
        "{err}"
    );
}

#[test]
fn fs_spec_new_refuses_comma_paths_and_bad_tags() {
    let err = FsSpec::new("/srv/a,b", "t").unwrap_err();
    assert_eq!(err, SpecError::FsPathComma("/srv/a,b".into()));
    assert_eq!(
        err.to_string(),
        "shared directory /srv/a,b: the path contains ',', which --fs PATH,tag=TAG cannot carry"
    );
    assert_eq!(
        FsSpec::new("/srv/a", "a,b"),
        Err(SpecError::Tag(TagError::BadChar {
            tag: "a,b".into(),
            c: ','
        }))
    );
    assert_eq!(
        FsSpec::new("/srv/a", ""),
        Err(SpecError::Tag(TagError::Empty))
    );
    assert_eq!(FsSpec::new("", "t"), Err(SpecError::EmptyFsPath));
}

#[test]
fn validate_tag_accepts_printable_ascii_up_to_36_bytes() {
    assert_eq!(validate_tag("husk-rootfs_1.2"), Ok(()));
    assert_eq!(validate_tag(&"~".repeat(TAG_MAX_LEN)), Ok(()));
}
