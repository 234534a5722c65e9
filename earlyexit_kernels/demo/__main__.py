from earlyexit_kernels.demo.report import main

main()
